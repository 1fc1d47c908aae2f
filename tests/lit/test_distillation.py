"""distill_depth on a Lightning Trainer: the student fits the source at fewer steps, resumes
from its checkpoint, and resode distill writes a loadable export."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.boring import loader
from helpers.cli import distill_command
from pytorch_lightning import Callback

from resode_lightning import (
    export_neural_ode,
    load_neural_ode,
    ode_resnet,
)
from resode_lightning.cli import main as resode
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.export.anytime import (
    at_steps,
    steps_of,
)
from resode_lightning.export.distill import distillation_loss
from resode_lightning.export.solve import NeuralODEStage
from resode_lightning.lit.distillation import distill_depth
from resode_lightning.testing import randomize_norms


def _net(depths=(8, 4), widths=(4, 8), init="iid", seed=0):
    return randomize_norms(ode_resnet(depths=depths, widths=widths, init=init, seed=seed)).eval()


# ----------------------------------------------------------------------------- run-time steps


# ----------------------------------------------------------------------------- distillation


class _Killed:
    """A loader whose process dies at its ``stop``-th batch (counted over epochs): an error out
    of Lightning's control, as a kill is (``KeyboardInterrupt`` would make Lightning exit)."""

    def __init__(self, loader, stop):
        self.loader, self.stop, self.seen = loader, stop, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.seen += 1
            if self.seen == self.stop:
                raise RuntimeError("killed")
            yield batch


class _Epochs(Callback):
    """Records the epoch of every training batch."""

    def __init__(self):
        self.epochs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.append(trainer.current_epoch)


def _kl_to_source(source, student, data, steps):
    with torch.no_grad(), at_steps(student, steps):
        return sum(
            distillation_loss(student(x), source(x), y, temperature=1.0, label_weight=0.0)
            for x, y in data
        )


def test_distill_depth_fits_the_source_at_fewer_steps_and_leaves_it_alone():
    source = _net(depths=(8,), widths=(4,))
    with torch.no_grad():
        source.fc.weight.mul_(30)  # confident logits, as a trained net's
    state = copy.deepcopy(source.state_dict())
    data = loader(count=16, size=16, batch_size=8)
    before = _kl_to_source(source, export_neural_ode(source), data, 2)
    student = distill_depth(
        source, data, steps=(0.25,), epochs=4, lr=0.01, label_weight=0.0, progress=False
    )
    assert _kl_to_source(source, student, data, 2) < 0.5 * before
    assert steps_of(student) == {"stages.0": ("euler", 8)} and not student.training
    assert all(torch.equal(v, state[k]) for k, v in source.state_dict().items())
    knotted = distill_depth(source, data, knots=4, epochs=1, progress=False)
    assert next(m for m in knotted.modules() if isinstance(m, NeuralODEStage)).field.path.count == 4


def test_distill_depth_resumes_from_its_checkpoint(tmp_path):
    source = _net(depths=(4,), widths=(4,))
    data = loader(count=16, size=16, batch_size=4)
    straight = distill_depth(source, data, epochs=2, progress=False)
    path = tmp_path / "distill.ckpt"
    with pytest.raises(RuntimeError, match="killed"):  # in epoch 2, after epoch 1's checkpoint
        distill_depth(source, _Killed(data, 6), epochs=2, checkpoint=path, progress=False)
    saved = torch.load(path, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 4)  # epoch 1 of 2 done, 4 batches
    epochs = _Epochs()
    resumed = distill_depth(
        source, data, epochs=2, checkpoint=path, progress=False, trainer={"callbacks": [epochs]}
    )
    assert epochs.epochs == [1] * 4  # the second invocation runs epoch 2 only
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
    done = distill_depth(source, data, epochs=2, checkpoint=path, progress=False)
    for key, value in straight.state_dict().items():  # a finished run resumes to its end
        torch.testing.assert_close(done.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="other settings"):
        distill_depth(source, data, epochs=2, lr=0.1, checkpoint=path, progress=False)
    weighted = distill_depth(
        source, data, step_weights=(1, 2, 4), warmup=0.5, epochs=1, progress=False
    )
    assert steps_of(weighted) == {"stages.0": ("euler", 4)}
    bad_settings = (
        {"epochs": 0},
        {"steps": ()},
        {"lr": 0.0},
        {"label_weight": 2.0},
        {"step_weights": (1, 2)},
        {"step_weights": (0, 0, 0)},
        {"warmup": 1.0},
    )
    for bad in bad_settings:
        with pytest.raises(ValueError):
            distill_depth(source, data, progress=False, **bad)


def test_cli_distill_writes_a_loadable_export_and_resumes(tmp_path, capsys):
    out = tmp_path / "ode.pt"
    argv = distill_command(tmp_path, "--step-weights", "1", "2", "--warmup", "0.1")
    assert resode(argv) == 0
    loaded = load_neural_ode(out)
    assert steps_of(loaded) == {"stages.0": ("euler", 4)}
    assert (tmp_path / "ode.pt.distill").is_file()
    assert "0.5" in capsys.readouterr().out
    assert resode(argv) == 0
    assert "resuming" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # an unknown --arch is a usage error
        resode([*argv[:2], "resnet7", *argv[3:]])
    assert exit_.value.code == 2
