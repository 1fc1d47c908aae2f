"""SmoothnessMonitor in real Trainer runs: logged keys, history, resume, DDP, NaN weights."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from torch import nn

from resode_lightning import SmoothnessMonitor, ode_resnet, resample_depth
from resode_lightning.core.metrics import ALL, METRICS, smoothness_metrics
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.core.parameters import stage_parameters
from resode_lightning.core.plots import smoothness_figure
from resode_lightning.core.stages import find_stages

SIZE = 8


def tiny(init: str = "smooth") -> nn.Module:
    return ode_resnet(depths=(3, 4), widths=(4, 8), init=init, seed=0)


def trainer(tmp_path: Path, module=pl, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        logger=module.loggers.CSVLogger(tmp_path, name="", version=0),
        max_steps=6,
        log_every_n_steps=2,
        num_sanity_val_steps=0,
    )
    return quiet_trainer(module, **{**options, **kwargs})


def csv_rows(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "version_0" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_arguments_are_validated():
    for kwargs, message in [
        ({"every_n_steps": 0}, "every_n_steps=...) must be a positive int or None, got 0"),
        ({"every_n_steps": 2.0}, "every_n_steps"),
        ({"probe_every_n_epochs": -1}, "probe_every_n_epochs"),
        ({"probe_samples": True}, "probe_samples=...) must be a positive int, got True"),
        ({"per_parameter": 1}, "per_parameter=...) must be a bool"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            SmoothnessMonitor(**kwargs)


def test_csv_logger_gets_the_documented_keys_at_the_trainer_interval(tmp_path):
    model = NestedBackboneModule(tiny())
    monitor = SmoothnessMonitor(probe_every_n_epochs=1)
    trainer_ = trainer(
        tmp_path, max_epochs=2, max_steps=-1, limit_val_batches=1, callbacks=[monitor]
    )
    trainer_.fit(model, loader(16, SIZE), loader(8, SIZE))
    rows = csv_rows(tmp_path)
    keys = set(rows[0])
    for stage in ("net.backbone.stages.0", "net.backbone.stages.1"):
        for metric in METRICS:
            assert f"smoothness/{stage}/{metric}" in keys
            assert f"smoothness/{stage}/conv2.weight/{metric}" in keys
            assert f"smoothness/{stage}/bn2.bias/{metric}" in keys
        assert f"smoothness/{stage}/depth_consistency" in keys
    key = "smoothness/net.backbone.stages.1/lipschitz"
    logged = {int(r["step"]): float(r[key]) for r in rows if r[key]}
    history = monitor.history["net.backbone.stages.1"]
    assert history["step"].tolist() == [2, 4, 6, 8]  # log_every_n_steps=2, 8 steps in 2 epochs
    assert history["parameters"][0] == ALL and "conv1.weight" in history["parameters"]
    shapes = {metric: tuple(values.shape) for metric, values in history["metrics"].items()}
    assert shapes == {metric: (4, len(history["parameters"])) for metric in METRICS}
    assert history["depth"].tolist() == [4, 4, 4, 4]
    assert history["depth_profile"].shape == (4, 3)
    # the logger shows the optimizer step each value was measured at, as the history does
    lipschitz = history["metrics"]["lipschitz"][:, 0]
    assert logged == pytest.approx(
        {s: float(v) for s, v in zip([2, 4, 6, 8], lipschitz, strict=True)}
    )
    row = history["parameters"].index("conv2.weight")
    key = "smoothness/net.backbone.stages.1/conv2.weight/total_variation"
    logged = {int(r["step"]): float(r[key]) for r in rows if r[key]}
    values = history["metrics"]["total_variation"][:, row].tolist()
    assert logged == pytest.approx(dict(zip([2, 4, 6, 8], values, strict=True)))
    # only the per-stage keys go through self.log, for other callbacks to monitor
    assert "smoothness/net.backbone.stages.1/lipschitz" in trainer_.callback_metrics
    assert not any("/conv2.weight/" in k for k in trainer_.callback_metrics)
    # the last value is the trained model's own, by an independent computation
    stage = find_stages(model)[1]
    expected = smoothness_metrics(stage_parameters(stage))[ALL]["lipschitz"]
    assert float(lipschitz[-1]) == pytest.approx(float(expected), rel=1e-5)
    profile = torch.stack([torch.cat([p.flatten() for p in b.parameters()]) for b in stage.blocks])
    assert history["depth_profile"][-1].tolist() == pytest.approx(
        (profile[1:] - profile[:-1]).norm(dim=1).tolist(), rel=1e-5
    )
    assert history["probe_step"].tolist() == [4, 8]
    assert torch.isfinite(history["depth_consistency"]).all()
    assert (tmp_path / "version_0" / "smoothness.png").read_bytes()[:4] == b"\x89PNG"


def test_plain_torchvision_stage_is_measured_in_the_ode_parametrisation(tmp_path):
    backbone = torchvision_resnet("resnet18", num_classes=10)
    monitor = SmoothnessMonitor(every_n_steps=1, per_parameter=False, plot=False)
    trainer(tmp_path, max_steps=1, log_every_n_steps=1, callbacks=[monitor]).fit(
        NestedBackboneModule(backbone, lr=0.0), loader(4, 16)
    )
    history = monitor.history["net.backbone.layer1"]
    # resnet18.layer1 has L = 2: bn2 counts at twice its value
    expected = smoothness_metrics(stage_parameters(find_stages(backbone)[0]))[ALL]
    assert [float(history["metrics"][m][0, 0]) for m in METRICS] == pytest.approx(
        [float(expected[m]) if m != "curvature" else math.nan for m in METRICS], nan_ok=True
    )
    assert not any("/bn2.weight/" in k for k in csv_rows(tmp_path)[0])


def test_resume_from_a_checkpoint_continues_the_history(tmp_path):
    straight = SmoothnessMonitor(every_n_steps=1, plot=False)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1
    )
    trainer(
        tmp_path / "a", max_steps=8, callbacks=[straight, checkpoint], enable_checkpointing=True
    ).fit(NestedBackboneModule(tiny()), loader(16, SIZE))
    resumed = SmoothnessMonitor(every_n_steps=1, plot=False)
    trainer(tmp_path / "b", max_steps=8, callbacks=[resumed]).fit(
        NestedBackboneModule(tiny()),
        loader(16, SIZE),
        ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt",
    )
    for name, expected in straight.history.items():
        got = resumed.history[name]
        assert got["step"].tolist() == list(range(1, 9))  # 1-4 from the checkpoint, 5-8 resumed
        torch.testing.assert_close(got["metrics"], expected["metrics"], equal_nan=True)
        torch.testing.assert_close(got["depth_profile"], expected["depth_profile"])


def test_two_monitors_keep_separate_state():
    assert SmoothnessMonitor().state_key != SmoothnessMonitor(every_n_steps=5).state_key


class _NaNModule(NestedBackboneModule):
    def configure_optimizers(self):
        with torch.no_grad():
            self.net["backbone"].stages[1][2].conv1.weight.fill_(math.nan)
        return super().configure_optimizers()


def test_non_finite_weights_warn_once_and_training_goes_on(tmp_path):
    monitor = SmoothnessMonitor(every_n_steps=1, plot=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=4, max_epochs=2, callbacks=[monitor]).fit(
            _NaNModule(tiny()), loader(8, SIZE)
        )
    messages = [str(w.message) for w in caught if "non-finite weights" in str(w.message)]
    assert len(messages) == 1  # the NaN spreads to every weight through the first update
    assert "stage 'net.backbone.stages.1': conv1.weight (from step 1)" in messages[0]
    assert messages[0].endswith("their metrics are logged as NaN/inf")
    history = monitor.history["net.backbone.stages.1"]
    assert history["step"].tolist() == [1, 2, 3, 4]
    row = history["parameters"].index("conv1.weight")
    assert torch.isnan(history["metrics"]["weight_norm"][:, row]).all()
    key = "smoothness/net.backbone.stages.1/weight_norm"
    logged = [r[key] for r in csv_rows(tmp_path) if r[key]]
    assert len(logged) == 4 and all(math.isnan(float(value)) for value in logged)


def test_a_module_without_stages_fails_at_setup(tmp_path):
    with pytest.raises(
        ValueError, match="SmoothnessMonitor: No residual stage found.*register_block"
    ):
        trainer(tmp_path, callbacks=[SmoothnessMonitor()]).fit(
            NestedBackboneModule(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 10))),
            loader(4, SIZE),
        )


def _deeper_container(backbone: nn.Module, original: nn.Module) -> None:
    backbone.stages[1] = resample_depth(backbone, {"stages.1": 8}).stages[1]


def _deeper_in_place(backbone: nn.Module, original: nn.Module) -> None:
    resample_depth(backbone, {"stages.1": 8}, inplace=True)


def _one_block_grown_into_a_stage(backbone: nn.Module, original: nn.Module) -> None:
    backbone.stages[1] = original  # one block is no stage: the monitor did not watch it


@pytest.mark.parametrize(
    "grow",
    [_deeper_container, _deeper_in_place, _one_block_grown_into_a_stage],
    ids=lambda f: f.__name__,
)
def test_the_monitor_history_survives_a_depth_change(tmp_path, grow):
    backbone = tiny()
    original = copy.deepcopy(backbone.stages[1])
    if grow is _one_block_grown_into_a_stage:
        del backbone.stages[1][1:]
    before: dict = {}
    monitor = SmoothnessMonitor(every_n_steps=1)

    class Grow(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # before the monitor measures step 3
                before.update(monitor.history)
                grow(pl_module.net["backbone"], original)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[Grow(), monitor]).fit(
            NestedBackboneModule(backbone), loader(16, SIZE)
        )
    assert not [w for w in caught if "SmoothnessMonitor" in str(w.message)]
    history = monitor.history[name := "net.backbone.stages.1"]
    if grow is _one_block_grown_into_a_stage:
        assert name not in before and history["step"].tolist() == [3, 4, 5, 6]
        assert history["depth"].tolist() == [4, 4, 4, 4]
    else:
        assert history["step"].tolist() == [1, 2, 3, 4, 5, 6]
        assert history["depth"].tolist() == [4, 4, 8, 8, 8, 8]
        kept = {k: v[:2] for k, v in history["metrics"].items()}
        torch.testing.assert_close(kept, before[name]["metrics"], rtol=0, atol=0)
        profile = history["depth_profile"]
        assert profile.shape == (6, 7) and torch.isnan(profile[:2, 3:]).all()
        assert torch.equal(profile[:2, :3], before[name]["depth_profile"])
        assert not torch.isnan(profile[2:]).any()
    # the rows after the change measure the live stage, by an independent computation
    live = {stage.name: stage for stage in find_stages(backbone)}["stages.1"]
    expected = smoothness_metrics(stage_parameters(live))[ALL]
    for metric in METRICS:
        assert float(history["metrics"][metric][-1, 0]) == pytest.approx(
            float(expected[metric]), rel=1e-5, nan_ok=True
        )
    assert (tmp_path / "version_0" / "smoothness.png").read_bytes()[:4] == b"\x89PNG"
    figure = smoothness_figure(monitor.history)
    (heatmap,) = [a for a in figure.axes if a.get_title() == f"{name}: slope in depth"]
    shapes = [mesh.get_array().shape for mesh in heatmap.collections]
    if grow is _one_block_grown_into_a_stage:
        assert shapes == [(3, 4)]
    else:  # rows of 4 blocks stretched over the axis of 8, on one colour scale
        assert shapes == [(3, 2), (7, 4)]
        low, high = (mesh.get_coordinates()[..., 1] for mesh in heatmap.collections)
        assert (low.min(), low.max()) == (high.min(), high.max()) == (0.5, 7.5)
        assert heatmap.collections[0].norm is heatmap.collections[1].norm


class _Predicting(NestedBackboneModule):
    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_validate_and_predict_need_no_stage(tmp_path):
    module = _Predicting(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 10)))
    monitor = SmoothnessMonitor(probe_every_n_epochs=1)
    run = trainer(tmp_path, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.validate(module, loader(4, SIZE))
        assert run.predict(module, loader(4, SIZE))
    assert not [w for w in caught if "SmoothnessMonitor" in str(w.message)]
    assert monitor.history == {}


def _replace_a_layer(backbone: nn.Module) -> None:
    block = backbone.stages[1][1]
    block.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    nn.init.normal_(block.conv1.weight, std=10.0)


def _replace_the_container(backbone: nn.Module) -> None:
    container = copy.deepcopy(backbone.stages[1])
    with torch.no_grad():
        container[2].conv2.weight.mul_(50.0)
    backbone.stages[1] = container


def _shrink_to_one_block(backbone: nn.Module) -> None:
    del backbone.stages[1][1:]


@pytest.mark.parametrize(
    "change",
    [_replace_a_layer, _replace_the_container, _shrink_to_one_block],
    ids=lambda f: f.__name__,
)
def test_the_monitor_follows_structure_changes(tmp_path, change):
    class Change(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                change(pl_module.net["backbone"])  # before the monitor measures step 2

    backbone = tiny()
    monitor = SmoothnessMonitor(every_n_steps=1, plot=False)
    trainer(tmp_path, max_steps=4, callbacks=[Change(), monitor]).fit(
        NestedBackboneModule(backbone, lr=0.0), loader(16, SIZE)
    )
    history = monitor.history["net.backbone.stages.1"]
    stages = {stage.name: stage for stage in find_stages(backbone)}
    if "stages.1" not in stages:  # a single block is no stage: its measurements stop
        assert history["step"].tolist() == [1]
        assert monitor.history["net.backbone.stages.0"]["step"].tolist() == [1, 2, 3, 4]
        return
    live = smoothness_metrics(stage_parameters(stages["stages.1"]))[ALL]
    for metric in METRICS:
        assert float(history["metrics"][metric][-1, 0]) == pytest.approx(
            float(live[metric]), rel=1e-5
        )
    lipschitz = history["metrics"]["lipschitz"][:, 0]
    assert float(lipschitz[-1]) > 2 * float(lipschitz[0])  # the change is a large one


def _state(**changes) -> dict:
    record = {
        "step": torch.tensor([1, 2]),
        "depth": torch.tensor([4, 4]),
        "parameters": [ALL, "w"],
        "metrics": {metric: torch.zeros(2, 2) for metric in METRICS},
        "depth_profile": torch.zeros(2, 3),
        "probe_step": torch.zeros(0, dtype=torch.int64),
        "depth_consistency": torch.zeros(0),
    }
    state = {"version": 2, "last_step": 2, "history": {"layer1": record}}
    for key, value in changes.items():
        (record if key in record else state)[key] = value
    return state


def test_load_state_dict_checks_its_input():
    monitor = SmoothnessMonitor()
    monitor.load_state_dict(_state())
    assert monitor.history["layer1"]["step"].tolist() == [1, 2]
    assert monitor.state_dict()["last_step"] == 2
    for state, message in [
        ([], "holds 'history', 'last_step' and 'version', got 'list'"),
        ({"version": 1}, "got \\['version'\\]"),
        (_state(version=3), "state version 3; this version of resode_lightning reads"),
        (_state(last_step="2"), "'last_step' is an int >= -1, got '2'"),
        (_state(history=[1]), "a smoothness history is a dict of stages, got list"),
        (_state(metrics={"lipschitz": torch.zeros(2, 3)}), r"'layer1': 'metrics' 'lipschitz' has"),
        (_state(metrics=torch.zeros(2, 2, len(METRICS))), "metric names, got Tensor"),
        (_state(metrics=[1]), "'metrics' is a dict of metric names, got list"),
        (_state(depth=torch.tensor([4])), r"'depth' holds 2 block counts >= 2, got \[4\]"),
        (_state(depth=torch.tensor([4, 1])), "'depth' holds 2 block counts"),
        (_state(depth=torch.tensor([4, 5])), r"'depth_profile' has 4 columns \(the most"),
        (_state(step=torch.tensor([2, 1])), "'step' is not strictly increasing"),
        (_state(step=torch.tensor([1.0, 2.0])), "'step' is an integer 1-d tensor"),
        (_state(parameters=["w", ALL]), "'parameters' starts with 'all'"),
        (_state(depth_profile=torch.zeros(3, 3)), "'depth_profile' has 2 rows, got 3"),
        (_state(probe_step=torch.tensor([2])), "one value per 'probe_step'"),
    ]:
        with pytest.raises(ValueError, match=f"^SmoothnessMonitor: .*{message}"):
            SmoothnessMonitor().load_state_dict(state)
    state = _state()
    del state["history"]["layer1"]["probe_step"]
    with pytest.raises(ValueError, match=r"entries missing: \['probe_step'\]"):
        SmoothnessMonitor().load_state_dict(state)


class _Logger(pl.loggers.Logger):
    """A logger that takes no image; its subclasses take them as W&B's and MLflow's do."""

    name = "fake"
    version = 0

    def __init__(self) -> None:
        super().__init__()
        self.figures: list = []

    @property
    def experiment(self):
        return self

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


class _WandbLike(_Logger):
    def log_image(self, **kwargs) -> None:
        self.figures.append(kwargs)


class _MLflowLike(_Logger):
    run_id = "run"

    def log_figure(self, *args) -> None:
        self.figures.append(args)


def test_the_figure_goes_to_loggers_that_take_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = pl.loggers.TensorBoardLogger(tmp_path, name="", version=0)
    others = [_WandbLike(), _MLflowLike(), _Logger()]
    trainer(
        tmp_path, max_steps=2, logger=[tensorboard, *others], callbacks=[SmoothnessMonitor()]
    ).fit(NestedBackboneModule(tiny()), loader(16, SIZE))
    assert (tmp_path / "version_0" / "smoothness.png").read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["smoothness"]
    assert [image.step for image in events.Images("smoothness")] == [2]
    (wandb,), (mlflow,) = others[0].figures, others[1].figures
    assert wandb["key"] == "smoothness" and wandb["step"] == 2 and len(wandb["images"]) == 1
    assert mlflow[0] == "run" and mlflow[2] == "smoothness.png"
    assert others[2].figures == []
    scalars = events.Tags()["scalars"]
    assert "smoothness/net.backbone.stages.1/conv2.weight/lipschitz" in scalars


def test_works_in_a_lightning_pytorch_trainer(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch", reason="the unified lightning package")

    class UnifiedModule(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tiny()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.backbone(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    monitor = SmoothnessMonitor(every_n_steps=2, plot=False)
    trainer(tmp_path, module=lightning, max_steps=4, callbacks=[monitor]).fit(
        UnifiedModule(), loader(16, SIZE)
    )
    assert monitor.history["backbone.stages.0"]["step"].tolist() == [2, 4]
    assert "smoothness/backbone.stages.0/lipschitz" in csv_rows(tmp_path)[0]


class _RankHistory(SmoothnessMonitor):
    """Saves each rank's history, since ddp_spawn does not send callbacks back."""

    def __init__(self, directory: str) -> None:
        super().__init__(every_n_steps=1, probe_every_n_epochs=1, probe_samples=4, plot=False)
        self.directory = directory

    def on_fit_end(self, trainer, pl_module) -> None:
        super().on_fit_end(trainer, pl_module)
        torch.save(self.history, Path(self.directory) / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_two_processes_identical_values_logged_once(tmp_path):
    monitor = _RankHistory(str(tmp_path))
    trainer(
        tmp_path,
        max_steps=3,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[monitor],
        log_every_n_steps=1,
        limit_val_batches=1,
    ).fit(NestedBackboneModule(tiny()), loader(16, SIZE), loader(16, SIZE, seed=1))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]:
        assert ranks[0][name]["step"].tolist() == [1, 2, 3]
        # each rank validates its own shard, but the probe runs on rank 0's batch everywhere
        assert ranks[0][name]["probe_step"].tolist() == [2]
        for entry in ("metrics", "depth_consistency"):
            torch.testing.assert_close(ranks[0][name][entry], ranks[1][name][entry], rtol=0, atol=0)
    key = "smoothness/net.backbone.stages.0/lipschitz"
    steps = [r["step"] for r in csv_rows(tmp_path) if r.get(key)]
    assert steps == ["1", "2", "3"]


def test_monitor_pickles_after_setup():
    """ddp_spawn and checkpointing pickle callbacks: the watched stages must not come along."""
    import pickle

    import torchvision

    from resode_lightning import SmoothnessMonitor

    monitor = SmoothnessMonitor()
    module = torch.nn.Module()
    module.net = torchvision.models.resnet18()
    monitor.setup(type("T", (), {"log_every_n_steps": 50})(), module, "fit")
    assert monitor._watched
    clone = pickle.loads(pickle.dumps(monitor))
    assert clone._watched is None and clone.every_n_steps == monitor.every_n_steps
