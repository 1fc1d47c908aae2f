"""Anytime depth: run-time steps of exports, depth-sampled training, depth distillation."""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from pytorch_lightning import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock, ResNet

from resode_lightning import (
    DepthSampling,
    ODEForm,
    export_neural_ode,
    find_stages,
    load_neural_ode,
    ode_resnet,
    save_neural_ode,
    to_ode_form,
)
from resode_lightning.cli import main as resode
from resode_lightning.core.coarse import BatchStatistics, coarse_grid, coarse_steps
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.core.models import PreActBlock
from resode_lightning.export.anytime import (
    accuracy_vs_steps,
    at_steps,
    field_evaluations,
    set_steps,
    steps_of,
)
from resode_lightning.export.distill import distillation_loss
from resode_lightning.export.solve import NeuralODEStage
from resode_lightning.lit.distillation import distill_depth
from resode_lightning.testing import randomize_norms


def _net(depths=(8, 4), widths=(4, 8), init="iid", seed=0):
    return randomize_norms(ode_resnet(depths=depths, widths=widths, init=init, seed=seed)).eval()


def _count_branch_calls(exported):
    """Counts the calls of every stage's branch (the grids' branch modules copy the hook)."""
    calls = []
    for module in exported.modules():
        if type(module).__name__ == "NeuralODEStage":
            conv = module.field.template.block.conv1
            conv.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


# ----------------------------------------------------------------------------- run-time steps


def test_set_steps_takes_ints_fractions_and_dicts_and_matches_a_fresh_export():
    net = _net()
    x = torch.randn(3, 3, 16, 16)
    ode = export_neural_ode(net)
    with torch.no_grad():
        full = ode(x)
        assert steps_of(ode) == {"stages.0": ("euler", 8), "stages.1": ("euler", 4)}
        previous = set_steps(ode, 0.25)
        assert previous == {"stages.0": ("euler", 8), "stages.1": ("euler", 4)}
        assert steps_of(ode) == {"stages.0": ("euler", 2), "stages.1": ("euler", 1)}
        torch.testing.assert_close(ode(x), export_neural_ode(net, steps=0.25)(x))
        set_steps(ode, 3)
        assert steps_of(ode) == {"stages.0": ("euler", 3), "stages.1": ("euler", 3)}
        set_steps(ode, {"stages.1": 2}, method="rk4")
        assert steps_of(ode) == {"stages.0": ("rk4", 3), "stages.1": ("rk4", 2)}
        expected = export_neural_ode(net, method="rk4", steps={"stages.0": 3, "stages.1": 2})
        torch.testing.assert_close(ode(x), expected(x))
        set_steps(ode, 1.0, method="euler")
        torch.testing.assert_close(ode(x), full, rtol=0, atol=0)


def test_steps_change_the_field_evaluations_and_the_context_restores_them():
    ode = export_neural_ode(_net(depths=(8,), widths=(4,)))
    calls = _count_branch_calls(ode)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ode(x)
        assert len(calls) == 8 == field_evaluations(ode)
        calls.clear()
        with at_steps(ode, 0.5):
            ode(x)
            assert len(calls) == 4 == field_evaluations(ode)
        calls.clear()
        with at_steps(ode, 1, method="rk4"):
            ode(x)
            assert len(calls) == 4 == field_evaluations(ode)
        assert steps_of(ode) == {"stages.0": ("euler", 8)}
        with pytest.raises(RuntimeError, match="inside"), at_steps(ode, 2):
            raise RuntimeError("inside")
        assert steps_of(ode) == {"stages.0": ("euler", 8)}
        calls.clear()
        ode(x)
        assert len(calls) == 8


def test_a_loaded_export_takes_steps_at_run_time(tmp_path):
    net = _net()
    path = save_neural_ode(export_neural_ode(net), tmp_path / "ode.pt")
    loaded = load_neural_ode(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), at_steps(loaded, 0.5):
        torch.testing.assert_close(loaded(x), export_neural_ode(net, steps=0.5)(x))


def test_set_steps_rejects_bad_budgets_and_adaptive_stages():
    ode = export_neural_ode(_net())
    for bad in (0, -1, 0.0, True, "4", {"stages.0": 0}, {"nope": 2}):
        with pytest.raises(ValueError):
            set_steps(ode, bad)
    with pytest.raises(ValueError, match="fixed-grid"):
        set_steps(ode, 2, method="dopri5")
    adaptive = export_neural_ode(_net(), method="dopri5")
    with pytest.raises(ValueError, match="adaptive"):
        set_steps(adaptive, 2)
    set_steps(adaptive, 2, method="euler")
    assert steps_of(adaptive) == {"stages.0": ("euler", 2), "stages.1": ("euler", 2)}
    with pytest.raises(ValueError, match="NeuralODEStage"):
        set_steps(torch.nn.Linear(2, 2), 2)
    assert steps_of(ode) == {"stages.0": ("euler", 8), "stages.1": ("euler", 4)}


def test_accuracy_vs_steps_scores_every_setting_and_restores_the_model():
    net = _net(depths=(8,), widths=(4,))
    ode = export_neural_ode(net)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (20,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    rows = accuracy_vs_steps(ode, loader, [1.0, 0.25, ("rk4", 0.25)], reference=net)
    assert [row["setting"] for row in rows] == ["reference", "1", "0.25", "rk4 0.25"]
    assert [row["evaluations"] for row in rows] == [None, 8, 2, 8]
    assert [row["steps"] for row in rows[1:]] == [{"stages.0": 8}, {"stages.0": 2}, {"stages.0": 2}]
    with torch.no_grad():
        for row, model in zip(rows, [net, ode, export_neural_ode(net, steps=2)]):
            expected = (model(images).argmax(1) == labels).double().mean().item()
            assert row["accuracy"] == pytest.approx(expected)
    assert rows[0]["latency_ratio"] == 1.0 and all(row["latency_ms"] > 0 for row in rows)
    assert rows[0]["accuracy"] == rows[1]["accuracy"] and rows[0]["images"] == 20
    assert steps_of(ode) == {"stages.0": ("euler", 8)}
    with pytest.raises(ValueError, match="warmup"):
        accuracy_vs_steps(ode, loader, [1.0], warmup=3)


# ----------------------------------------------------------------------------- depth sampling


def test_coarse_grid_puts_each_step_on_one_block():
    assert coarse_grid(16, 16) == [0.0] * 16
    assert coarse_grid(16, 4) == [0.0, None, None, None] * 4
    offsets = coarse_grid(16, 5)
    assert [k for k, w in enumerate(offsets) if w is not None] == [0, 3, 6, 9, 12]
    assert [offsets[k] for k in (0, 3, 6, 9, 12)] == [0.0, 0.2, 0.4, 0.6, 0.8]
    for bad in (0, 17):
        with pytest.raises(ValueError, match="between 1"):
            coarse_grid(16, bad)


@pytest.mark.parametrize("steps", [8, 5, 3, 1])
def test_coarse_steps_compute_the_exports_euler_steps(steps):
    net = _net(depths=(8,), widths=(4,))
    x = torch.randn(2, 3, 16, 16)
    stage = find_stages(net)[0]
    children = list(stage.container.children())
    with torch.no_grad():
        with coarse_steps(stage, steps):
            coarse = net(x)
        expected = export_neural_ode(net, steps=steps, fold_bn=False)(x)
        torch.testing.assert_close(coarse, expected, rtol=1e-5, atol=1e-5)
    assert list(stage.container.children()) == children
    assert all(block.step == 1 / 8 for block in children)


def test_coarse_steps_on_a_post_activation_torchvision_stage():
    torch.manual_seed(0)
    net = randomize_norms(ResNet(BasicBlock, [4, 1, 1, 1], num_classes=10))
    net = to_ode_form(net).eval()
    stage = find_stages(net)[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
        for steps in (2, 3):
            with coarse_steps(stage, steps):
                coarse = net(x)
            expected = export_neural_ode(net, steps={"layer1": steps}, fold_bn=False)(x)
            torch.testing.assert_close(coarse, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    plain = find_stages(ResNet(BasicBlock, [4, 1, 1, 1]))[0]
    with pytest.raises(ValueError, match="not in ODE form"), coarse_steps(plain, 2):
        pass


def test_coarse_steps_train_the_blocks_a_step_starts_on_with_interpolated_weights():
    net = _net(depths=(8,), widths=(4,))
    blocks = find_stages(net)[0].blocks
    with coarse_steps(find_stages(net)[0], 3):  # steps start on blocks 0, 2 (+2/3), 5 (+1/3)
        net(torch.randn(4, 3, 16, 16)).square().mean().backward()
    grads = [b.conv1.weight.grad for b in blocks]
    assert [g is not None for g in grads] == [True, False, True, True, False, True, True, False]
    twin = _net(depths=(8,), widths=(4,))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with coarse_steps(find_stages(twin)[0], 3):
        out = twin(x)
    (weight,) = torch.autograd.grad(out.sum(), find_stages(twin)[0].blocks[3].conv1.weight)
    assert weight.abs().sum() > 0  # block 3 only enters through the interpolation at 2 + 2/3


def test_fewer_steps_normalise_with_the_full_depth_statistics_of_the_batch():
    net = _net(depths=(8,), widths=(4,)).train()
    stage = find_stages(net)[0]
    norms = [m for b in stage.blocks for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(4, 3, 16, 16)
    with BatchStatistics(norms) as statistics:
        net(x)  # full depth: batch statistics, recorded, running statistics updated
    recorded = dict(statistics.values)
    running = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    with coarse_steps(stage, 3, statistics.values):
        out = net(x)
    assert all(n.training for n in norms)
    for norm, (mean, var) in zip(norms, running):  # the fewer steps update nothing
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    # differentiable in the statistics: the gradient reaches blocks no step starts on
    out.square().mean().backward()
    assert stage.blocks[1].conv1.weight.grad.abs().sum() > 0
    # what the fewer steps compute: the eval-mode stage with those statistics as running ones
    twin = copy.deepcopy(net)
    twins = [m for b in find_stages(twin)[0].blocks for m in b.modules()]
    twins = [m for m in twins if isinstance(m, torch.nn.BatchNorm2d)]
    for norm, original in zip(twins, norms):  # the stem's norm keeps batch statistics
        norm.running_mean, norm.running_var = (v.detach() for v in recorded[original])
        norm.eval()
    with torch.no_grad(), coarse_steps(find_stages(twin)[0], 3):
        torch.testing.assert_close(twin(x), out.detach())
    net(x)  # outside the with block nothing is recorded
    assert all(statistics.values[n] is recorded[n] for n in norms)
    with pytest.raises(ValueError, match="affine"):
        BatchStatistics([torch.nn.BatchNorm2d(4, affine=False)])


class _CountBlocks(Callback):
    """Records, per training batch, how many stage blocks ran with gradient and whether the BN
    running statistics moved."""

    def __init__(self):
        self.calls, self.moved = [], []

    def on_fit_start(self, trainer, pl_module):
        self.blocks = list(pl_module.net["backbone"].stages[0])
        for block in self.blocks:
            block.register_forward_pre_hook(self._count)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append(0)
        self.stats = self.blocks[0].bn1.running_mean.clone()

    def _count(self, module, args):
        self.calls[-1] += torch.is_grad_enabled()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.moved.append(not torch.equal(self.blocks[0].bn1.running_mean, self.stats))


def _fit(callbacks, steps=6):
    module = NestedBackboneModule(ode_resnet(depths=(8,), widths=(4,), init="tied", seed=0))
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, loader(count=4 * steps, size=16))
    return module


def test_depth_sampling_runs_every_batch_at_full_depth_and_the_other_counts():
    counter = _CountBlocks()
    module = _fit([DepthSampling(steps=(1.0, 0.5, 0.25)), counter], steps=3)
    assert counter.calls == [8 + 4 + 2] * 3  # blocks run with gradient per batch
    assert all(counter.moved)  # the full-depth pass updates the running statistics
    stage = find_stages(module)[0]
    assert all(isinstance(b, PreActBlock) and b.step == 1 / 8 for b in stage.blocks)
    chain = [module, module.net["backbone"], stage.container]  # hooked while fitting only
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in chain)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_depth_sampling_trains_ode_form_torchvision_and_timm_nets(kind):
    if kind == "timm":
        timm = pytest.importorskip("timm")
        net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        net = ResNet(BasicBlock, [3, 1, 1, 1], num_classes=10)
    module = NestedBackboneModule(net)
    stage = find_stages(net)[0]
    blocks, calls = stage.blocks, []
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    before = [b.conv1.weight.detach().clone() for b in blocks]
    trainer = quiet_trainer(
        max_steps=2, limit_val_batches=0, callbacks=[ODEForm(), DepthSampling(steps=(1.0, 0.5))]
    )
    trainer.fit(module, loader(count=8, size=32))
    depth = stage.depth
    assert sum(calls) == 2 * (depth + max(1, depth // 2))  # full + half, per batch
    assert find_stages(net)[0].blocks == blocks and find_stages(net)[0].is_ode_form
    assert all(not torch.equal(b.conv1.weight, w) for b, w in zip(blocks, before))


def test_depth_sampling_draws_reproducibly_and_pickles():
    sampling = DepthSampling(steps=(1.0, 0.5, 0.25), draws=1, seed=3)
    counter = _CountBlocks()
    _fit([sampling, counter], steps=12)
    draws = [8 + [4, 2][random.Random(f"3:0:{i}").sample([0, 1], 1)[0]] for i in range(12)]
    assert counter.calls == draws and set(draws) == {8 + 4, 8 + 2}
    pickle.loads(pickle.dumps(sampling))


def test_depth_sampling_validates_its_arguments_and_the_model():
    for bad in ((), (0.0,), (1.5,), (0,), (True,), ("1",)):
        with pytest.raises(ValueError, match="steps"):
            DepthSampling(steps=bad)
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match="draws"):
            DepthSampling(draws=bad)
    with pytest.raises(ValueError, match="exceed the depth"):
        _fit([DepthSampling(steps=(16,))], steps=1)
    plain = NestedBackboneModule(ResNet(BasicBlock, [3, 1, 1, 1]))
    trainer = Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, callbacks=[DepthSampling()]
    )
    with pytest.raises(ValueError, match="not in ODE form"):
        trainer.fit(plain, loader(count=4, size=16))


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
    weights = tmp_path / "net.pth"
    torch.save(ode_resnet(depths=(4,), widths=(4,), in_channels=1, seed=0).state_dict(), weights)
    out = tmp_path / "ode.pt"
    argv = [
        "distill",
        "--arch",
        "ode_resnet",
        "--arch-kwargs",
        '{"depths": [4], "widths": [4]}',
        "--weights",
        str(weights),
        "--data",
        "digits",
        "--image-size",
        "8",
        "--epochs",
        "1",
        "--steps",
        "1.0",
        "0.5",
        "--step-weights",
        "1",
        "2",
        "--warmup",
        "0.1",
        "--out",
        str(out),
        "--no-progress",
    ]
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
