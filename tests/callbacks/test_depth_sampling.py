"""DepthSampling: its solvers, its losses attached to the full-depth output, its roughness."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from pytorch_lightning import Callback
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from resode_lightning import (
    DepthSampling,
    export_neural_ode,
    find_stages,
    ode_resnet,
    smoothness_report,
    to_ode_form,
)
from resode_lightning.callbacks.depth_passes import (
    evaluation_points,
    inplace_distillation,
    label_cross_entropy,
    roughness,
    stage_at_steps,
)
from resode_lightning.core.coarse import BatchStatistics
from resode_lightning.export.anytime import at_steps, steps_of
from resode_lightning.export.options import ExportOptions
from resode_lightning.lit.distillation import distill_depth
from resode_lightning.testing import randomize_norms


def _labels(output, full, batch):
    return nn.functional.cross_entropy(output, batch[1])


class _Record(Callback):
    """Keeps the logged metrics and the gradients of the first optimizer step."""

    def __init__(self):
        self.metrics, self.grads = [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _module(init="iid", depth=8, backbone_call=False):
    net = randomize_norms(ode_resnet(depths=(depth,), widths=(4,), init=init, seed=0))
    module = NestedBackboneModule(net, lr=0.1)
    if backbone_call:  # training_step calls the backbone, not the LightningModule
        module.forward = lambda x: module.net["backbone"](x)
    return module


def _fit(module, sampling, steps=1, **trainer):
    record = _Record()
    quiet_trainer(
        max_steps=steps, limit_val_batches=0, callbacks=[sampling, record], **trainer
    ).fit(module, loader(count=8 * steps, size=16, batch_size=8))
    return record


# ----------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_stage_at_steps_computes_the_exports_fixed_grid_solvers(method):
    net = randomize_norms(ode_resnet(depths=(12,), widths=(4,), init="iid", seed=0)).eval()
    ode = export_neural_ode(net)
    x = torch.randn(2, 3, 16, 16)
    for steps in (1, 2, 5, 12):
        with torch.no_grad(), at_steps(ode, steps, method):
            expected = ode(x)
        with torch.no_grad(), stage_at_steps(find_stages(net)[0], method, steps):
            torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    tv = randomize_norms(ResNet(BasicBlock, [4, 1, 1, 1], num_classes=10)).eval()
    to_ode_form(tv, inplace=True)  # post-activation blocks: the field projected at the step
    ode, x = export_neural_ode(tv), torch.randn(2, 3, 32, 32)
    with torch.no_grad(), at_steps(ode, 3, method):
        expected = ode(x)
    with torch.no_grad(), stage_at_steps(find_stages(tv)[0], method, 3):
        torch.testing.assert_close(tv(x), expected, rtol=1e-4, atol=1e-4)
    assert all(b.bn2.step == 1 / 4 for b in find_stages(tv)[0].blocks)


def test_rk4_evaluates_the_blocks_its_stages_fall_on_differentiably():
    assert evaluation_points(8, 1, (0.0, 1 / 3, 2 / 3, 1.0)) == [
        [(0, 0.0), (2, 2 / 3), (5, 1 / 3), (7, 0.0)]  # 0, 8/3, 16/3 and 8 (the path's end)
    ]
    net = randomize_norms(ode_resnet(depths=(8,), widths=(4,), init="iid", seed=0))
    stage = find_stages(net)[0]
    with stage_at_steps(stage, "rk4", 1):
        net(torch.randn(4, 3, 16, 16)).square().mean().backward()
    touched = [b.conv1.weight.grad is not None for b in stage.blocks]
    assert touched == [True, False, True, True, False, True, True, True]
    with (
        pytest.raises(ValueError, match="method must be one of"),
        stage_at_steps(stage, "dopri5", 1),
    ):
        pass
    with pytest.raises(ValueError, match="between 1"), stage_at_steps(stage, "rk4", 9):
        pass


def test_solver_sampling_backpropagates_every_pass_with_both_solvers():
    """The gradient of one step is that of the full-depth loss plus every pass's, computed by
    hand; each pass's loss is logged under its method."""
    module = _module()
    twin = copy.deepcopy(module.net["backbone"]).train()
    sampling = DepthSampling(steps=(1.0, 0.5), methods=("euler", "rk4"), loss=_labels)
    record = _fit(module, sampling)
    x, y = next(iter(loader(count=8, size=16, batch_size=8)))
    stage = find_stages(twin)[0]
    norms = [m for b in stage.blocks for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    with BatchStatistics(norms) as statistics:
        total = nn.functional.cross_entropy(twin(x), y)
    for method, steps in (("rk4", 2), ("euler", 4), ("rk4", 1)):  # rk4: 8 and 4 evaluations
        with stage_at_steps(stage, method, steps, statistics.values):
            total = total + nn.functional.cross_entropy(twin(x), y)
    total.backward()
    for name, parameter in twin.named_parameters():
        torch.testing.assert_close(
            record.grads[f"net.backbone.{name}"], parameter.grad, rtol=1e-4, atol=1e-6
        )
    logged = record.metrics[0]
    assert {"depth_sampling/rk4@1", "depth_sampling/euler@0.5", "depth_sampling/rk4@0.5"} <= set(
        logged
    )
    assert logged["depth_sampling/rk4@0.5"] > 0


def test_the_passes_are_scaled_as_lightning_scales_the_loss_and_update_no_statistics():
    plain, sampled = _module(), _module()
    reference = _fit(plain, DepthSampling(steps=(1.0,)), accumulate_grad_batches=2)
    weights = DepthSampling(steps=(1.0, 0.5), weights=(1.0, 0.0), loss=_labels)
    record = _fit(sampled, weights, accumulate_grad_batches=2)
    for name, grad in reference.grads.items():  # a pass of weight 0 adds nothing
        torch.testing.assert_close(record.grads[name], grad, rtol=1e-5, atol=1e-7)
    for a, b in zip(plain.modules(), sampled.modules()):
        if isinstance(a, nn.BatchNorm2d):  # the passes leave the running statistics alone
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
            assert a.num_batches_tracked == b.num_batches_tracked
    once, twice = _module(), _module()
    one = _fit(once, DepthSampling(steps=(1.0, 0.5), loss=_labels))
    two = _fit(twice, DepthSampling(steps=(1.0, 0.5), loss=_labels), accumulate_grad_batches=2)
    for name, grad in one.grads.items():  # one batch of two accumulated: all of it halved
        torch.testing.assert_close(two.grads[name], grad / 2, rtol=1e-5, atol=1e-8)


def test_the_call_of_the_backbone_carries_the_passes_and_no_call_is_refused():
    module = _module(backbone_call=True)
    record = _fit(module, DepthSampling(steps=(1.0, 0.5), methods=("rk4",)))
    assert "depth_sampling/rk4@0.5" in record.metrics[0]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())

    class Bypass(NestedBackboneModule):
        def training_step(self, batch, batch_idx):
            x, y = batch  # every module on the way to the stage called by its forward
            net = self.net["backbone"]
            features = net.stages[0].forward(net.stem(x))
            return nn.functional.cross_entropy(net.fc(net.pool(features).flatten(1)), y)

    bypass = Bypass(ode_resnet(depths=(4,), widths=(4,), seed=0))
    with pytest.raises(ValueError, match="made no call of the model"):
        _fit(bypass, DepthSampling(steps=(1.0, 0.5)))


def test_an_export_trains_at_steps_of_its_own_method():
    """distill_depth's student runs rk4: its half-depth pass is rk4 at L/2 steps."""
    source = randomize_norms(ode_resnet(depths=(8,), widths=(4,), init="iid", seed=0)).eval()
    record = _Record()
    student = distill_depth(
        source,
        loader(count=8, size=16, batch_size=8),
        steps=(1.0, 0.5),
        options=ExportOptions(method="rk4", gradient="backprop"),
        epochs=1,
        progress=False,
        trainer={"callbacks": [record]},
    )
    passes = {k for k in record.metrics[0] if k.startswith("depth_sampling/")}
    assert passes == {"depth_sampling/rk4@0.5", "depth_sampling/rk4@0.5_step"}
    assert steps_of(student) == {"stages.0": ("rk4", 8)}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ----------------------------------------------------------------------------- roughness


def test_roughness_of_a_linear_path_has_no_second_difference():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    stacked = {"w": torch.stack([a + k * b for k in range(6)])}
    size = stacked["w"].square().sum((1, 2)).mean()
    expected = 36 * b.square().sum() / size  # (m / horizon)² · ||Δθ||² / mean ||θ||²
    torch.testing.assert_close(roughness(stacked, 1.0, 1), expected)
    assert float(roughness(stacked, 1.0, 2)) < 1e-9
    assert roughness({"w": stacked["w"][:2]}, 1.0, 2) is None


def test_the_roughness_penalty_lowers_the_measured_roughness():
    rough = {}
    for weight in (0.0, 0.05):
        module = _module(depth=6)
        record = _fit(module, DepthSampling(steps=(1.0,), roughness=weight), steps=8)
        (row,) = smoothness_report(module)
        rough[weight] = row["relative_roughness"], row["lipschitz"]
        if weight:
            assert record.metrics[-1]["depth_sampling/roughness"] > 0
    assert rough[0.05][0] < 0.9 * rough[0.0][0] and rough[0.05][1] < rough[0.0][1]
    with pytest.raises(ValueError, match="at least 3 blocks"):
        _fit(_module(depth=2), DepthSampling(steps=(1.0,), roughness=1.0, roughness_order=2))


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"methods": ("dopri5",)}, "methods"),
        ({"methods": ("euler", "euler")}, "methods"),
        ({"methods": ()}, "methods"),
        ({"weights": (1.0,)}, "weights"),
        ({"weights": (1.0, -1.0, 1.0)}, "weights"),
        ({"weights": (1.0, float("nan"), 1.0)}, "weights"),
        ({"loss": "cross_entropy"}, "loss"),
        ({"roughness": -1.0}, "roughness"),
        ({"roughness": float("inf")}, "roughness"),
        ({"roughness": True}, "roughness"),
        ({"roughness_order": 3}, "roughness_order"),
        ({"roughness_order": True}, "roughness_order"),
        ({"draws": 0}, "draws"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_arguments_are_named(arguments, named):
    with pytest.raises(ValueError, match=rf"DepthSampling\({named}=\.\.\.\)"):
        DepthSampling(**arguments)


def test_the_default_loss_is_the_cross_entropy_on_the_labels():
    default = _fit(_module(), DepthSampling(steps=(1.0, 0.5)))
    labels = _fit(_module(), DepthSampling(steps=(1.0, 0.5), loss=_labels))
    for name, grad in labels.grads.items():
        torch.testing.assert_close(default.grads[name], grad, rtol=0, atol=0)
    logits = torch.randn(4, 10)
    for batch in ((torch.randn(4, 3),), (torch.randn(4, 3), torch.randn(4)), torch.randn(4)):
        with pytest.raises(ValueError, match="default loss is the cross-entropy on the labels"):
            label_cross_entropy(logits, logits, batch)
    assert float(inplace_distillation(logits, logits, None)) == pytest.approx(0.0, abs=1e-6)
    assert float(inplace_distillation(torch.randn(4, 10), logits, None)) > 0


def test_a_loss_that_is_no_scalar_is_refused_at_the_first_batch():
    with pytest.raises(ValueError, match=r"loss=\.\.\.\) must return a 0-d tensor"):
        _fit(_module(), DepthSampling(steps=(1.0, 0.5), loss=lambda out, full, batch: out))


def test_settings_draws_and_pickling():
    sampling = DepthSampling(steps=(1.0, 0.5, 0.25), methods=("euler", "rk4"), draws=2, seed=1)
    module = _module(depth=8)
    sampling.on_fit_start(quiet_trainer(), module)
    try:
        assert [(label, method, steps) for label, _, method, steps in sampling.settings()] == [
            ("rk4@1", "rk4", {"net.backbone.stages.0": 2}),
            ("euler@0.5", "euler", {"net.backbone.stages.0": 4}),
            ("rk4@0.5", "rk4", {"net.backbone.stages.0": 1}),
            ("euler@0.25", "euler", {"net.backbone.stages.0": 2}),
        ]  # rk4 at 2 evaluations repeats rk4@0.5: left out
        draws = [sampling.draw(0, i) for i in range(20)]
        assert all(len(d) == 2 for d in draws) and len({tuple(d) for d in draws}) > 1
        assert draws == [sampling.draw(0, i) for i in range(20)]
    finally:
        sampling.teardown(None, module, "fit")
    assert not any(m._forward_hooks for m in module.modules())
    copied = pickle.loads(pickle.dumps(sampling))
    assert copied.methods == ("euler", "rk4") and copied.settings() == []
