"""The callbacks' saved state and setup checks: SmoothnessMonitor states of every version,
typed hooks, NeuralODEExport's check that its file can be written.

``data/smoothness_monitor_state_v1.pt`` is the ``state_dict()`` of a SmoothnessMonitor of state
version 1 (commit 28e9dc7), saved with ``torch.save`` after this run: ``ode_resnet(depths=(3, 4),
widths=(4, 8), init="iid", seed=0)`` in ``helpers.boring.NestedBackboneModule(lr=0.1)``,
``SmoothnessMonitor(every_n_steps=1, probe_every_n_epochs=1, probe_samples=4, plot=False)``,
``quiet_trainer(max_steps=4, num_sanity_val_steps=0, limit_val_batches=1)`` on ``loader(8, 8)``
and ``loader(4, 8)``, with ``resample_depth(backbone, {"stages.1": 6}, inplace=True)`` at the
end of the third step (before the monitor measured it).
"""

from __future__ import annotations

import csv
import inspect
import sys
import typing
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from helpers.runif import RunIf

import resode_lightning.callbacks as callbacks
from resode_lightning import NeuralODEExport, SmoothnessMonitor, ode_resnet
from resode_lightning.core import metrics as metrics_module
from resode_lightning.core.metrics import METRICS

V1_STATE = Path(__file__).parents[1] / "fixtures" / "smoothness_monitor_state_v1.pt"
V1_METRICS = ["weight_norm", "lipschitz", "total_variation", "relative_roughness", "curvature"]
"""The order of the last dimension of a version-1 state's ``"metrics"``."""
STAGES = ("net.backbone.stages.0", "net.backbone.stages.1")
ADDED = "mean_step"


def stored_v1_state() -> dict:
    state = torch.load(V1_STATE, weights_only=True)
    assert state["version"] == 1 and state["last_step"] == 4
    return state


def exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def monitor() -> SmoothnessMonitor:
    return SmoothnessMonitor(every_n_steps=1, probe_every_n_epochs=1, probe_samples=4, plot=False)


def model() -> NestedBackboneModule:
    return NestedBackboneModule(ode_resnet(depths=(3, 4), widths=(4, 8), init="iid", seed=0))


@pytest.fixture
def added_metric(monkeypatch):
    """A metric added after version 1: the mean step ``mean_k ||θ_{k+1} - θ_k||``."""
    compute = metrics_module.metrics_from_profiles

    def with_mean_step(norms2, first2, second2):
        return {**compute(norms2, first2, second2), ADDED: first2.sqrt().mean(-1)}

    monkeypatch.setattr(metrics_module, "metrics_from_profiles", with_mean_step)
    extended = (*METRICS, ADDED)
    for name, module in list(sys.modules.items()):
        if name.startswith("resode_lightning") and getattr(module, "METRICS", None) is METRICS:
            monkeypatch.setattr(module, "METRICS", extended)
    return extended


def test_a_version_1_state_converts_by_metric_name_with_the_depth_of_every_row():
    stored = stored_v1_state()
    resumed = monitor()
    resumed.load_state_dict(stored)
    for name in STAGES:
        record, old = resumed.history[name], stored["history"][name]
        assert list(record["metrics"]) == list(METRICS)
        for column, metric in enumerate(V1_METRICS):
            exact(record["metrics"][metric], old["metrics"][..., column])
        exact(record["depth_profile"], old["depth_profile"])
        assert record["probe_step"].tolist() == [2, 4]
    # the depths were not saved in version 1: they are read from the NaN padding
    assert resumed.history[STAGES[0]]["depth"].tolist() == [3, 3, 3, 3]
    assert resumed.history[STAGES[1]]["depth"].tolist() == [4, 4, 6, 6]
    state = resumed.state_dict()
    assert state["version"] == 2 and state["last_step"] == 4
    again = monitor()
    again.load_state_dict(state)
    for name in STAGES:
        for key, value in state["history"][name].items():
            got = again.history[name][key]
            if key == "metrics":
                assert got.keys() == value.keys()
                for metric in value:
                    exact(got[metric], value[metric])
            elif isinstance(value, torch.Tensor):
                exact(got, value)
            else:
                assert got == value


def test_a_version_1_checkpoint_resumes_after_a_metric_is_added(tmp_path, added_metric):
    run = tmp_path / "first"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=run, every_n_train_steps=4, save_top_k=-1)
    first = monitor()
    quiet_trainer(
        max_steps=4,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[first, checkpoint],
    ).fit(model(), loader(8, 8), loader(4, 8))
    path = run / "epoch=1-step=4.ckpt"
    saved = torch.load(path, weights_only=True)
    saved["callbacks"][first.state_key] = stored_v1_state()  # as an older version wrote it
    torch.save(saved, path)

    resumed = monitor()
    logger = pl.loggers.CSVLogger(tmp_path, name="", version=0)
    quiet_trainer(
        max_steps=8,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[resumed],
    ).fit(model(), loader(8, 8), loader(4, 8), ckpt_path=path)

    stored = stored_v1_state()["history"]
    for name in STAGES:
        record = resumed.history[name]
        assert record["step"].tolist() == list(range(1, 9))
        assert list(record["metrics"]) == list(added_metric)
        for column, metric in enumerate(V1_METRICS):  # steps 1-4 as saved
            exact(record["metrics"][metric][:4], stored[name]["metrics"][..., column])
        assert torch.isnan(record["metrics"][ADDED][:4]).all()  # not measured back then
        # from step 5 on, the added metric is measured: the mean of the depth profile
        profile = record["depth_profile"][4:]
        mean_step = [float(row[~row.isnan()].mean()) for row in profile]
        assert record["metrics"][ADDED][4:, 0].tolist() == pytest.approx(mean_step, rel=1e-5)
        assert record["probe_step"].tolist() == [2, 4, 6, 8]
    # the resumed model is the checkpoint's, with stage 1 at its original depth 4
    assert resumed.history[STAGES[1]]["depth"].tolist() == [4, 4, 6, 6, 4, 4, 4, 4]
    with open(tmp_path / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    key = f"smoothness/{STAGES[1]}/{ADDED}"
    assert [int(row["step"]) for row in rows if row.get(key)] == [5, 6, 7, 8]


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (3, "state version 3; this version of resode_lightning reads versions 1 to 2"),
        (0, "state version 0"),
        (True, "state version True"),
        ("2", "state version '2'"),
        (2.0, "state version 2.0"),
    ],
)
def test_unknown_state_versions_are_refused(version, message):
    state = {**stored_v1_state(), "version": version}
    with pytest.raises(ValueError, match=f"^SmoothnessMonitor: checkpoint {message}"):
        monitor().load_state_dict(state)


def test_a_version_2_state_holding_version_1_records_is_refused_by_entry():
    state = stored_v1_state()
    del state["history"][STAGES[0]]["probe_step"]
    with pytest.raises(ValueError, match=r"stage 'net.backbone.stages.0': entries missing: "):
        monitor().load_state_dict(state)


def test_every_callback_hook_is_typed_and_overrides_a_lightning_hook():
    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        hooks = [h for h in vars(cls) if not h.startswith("_") and hasattr(pl.Callback, h)]
        assert hooks, name
        for hook in hooks:
            method = vars(cls)[hook]
            method = method.fget if isinstance(method, property) else method
            assert getattr(method, "__override__", False), f"{name}.{hook} lacks @override"
            hints = typing.get_type_hints(method)
            parameters = list(inspect.signature(method).parameters)[1:]
            missing = [p for p in [*parameters, "return"] if p not in hints]
            assert not missing, f"{name}.{hook} has no type for {missing}"
            if "trainer" in parameters:
                assert hints["trainer"] is pl.Trainer, f"{name}.{hook}"
                assert hints["pl_module"] is pl.LightningModule, f"{name}.{hook}"


@RunIf(not_root=True)  # root writes into read-only folders: chmod cannot lock one
def test_export_refuses_a_read_only_folder_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for path in (locked / "ode.pt", locked / "sub" / "ode.pt"):
            module = NestedBackboneModule(ode_resnet(depths=(2,), widths=(4,), seed=0))
            trainer = quiet_trainer(max_steps=1, callbacks=[NeuralODEExport(path)])
            with pytest.raises(ValueError, match=r"^NeuralODEExport: cannot write .*ode\.pt'"):
                trainer.fit(module, loader(count=4, size=8))
            assert trainer.global_step == 0
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
