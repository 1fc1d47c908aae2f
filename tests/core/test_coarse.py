"""A stage run at fewer steps, differentiably, on full-depth BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

from resode_lightning import (
    export_neural_ode,
    find_stages,
    ode_resnet,
    to_ode_form,
)
from resode_lightning.core.coarse import BatchStatistics, coarse_grid, coarse_steps
from resode_lightning.testing import randomize_norms


def _net(depths=(8, 4), widths=(4, 8), init="iid", seed=0):
    return randomize_norms(ode_resnet(depths=depths, widths=widths, init=init, seed=seed)).eval()


# ----------------------------------------------------------------------------- run-time steps


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
