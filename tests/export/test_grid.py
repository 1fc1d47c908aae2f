"""The fixed-grid fast path: torchdiffeq's results on the same grid for every Runge-Kutta method
it has, weights never stale, and binomial checkpointing with backprop's gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resode_lightning import export_neural_ode, ode_resnet
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.revolve import binomial_checkpoint, recomputations
from resode_lightning.export.solve import NeuralODEStage
from resode_lightning.testing import randomize_norms


def stages(model: nn.Module) -> list[NeuralODEStage]:
    return [m for m in model.modules() if isinstance(m, NeuralODEStage)]


def torchdiffeq_solution(stage: NeuralODEStage, x: torch.Tensor) -> torch.Tensor:
    """The stage solved by torchdiffeq's own fixed-grid solver on the same uniform grid."""
    end = stage.horizon.to(x.dtype)
    return stage._solve(stage._func(x), x, x.new_zeros(()), end, stage.steps)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def small_resnet() -> nn.Module:
    return randomize_norms(torchvision_resnet("resnet34", num_classes=10)).eval()


def small_ode_resnet() -> nn.Module:
    return randomize_norms(ode_resnet(depths=(6,), widths=(8,), init="iid", seed=0)).eval()


@pytest.mark.parametrize("method", list(GRID_METHODS))
@pytest.mark.parametrize("steps", [None, 0.5, 7])
@pytest.mark.parametrize("make", [small_resnet, small_ode_resnet])
def test_fast_path_gives_torchdiffeq_results_on_the_same_grid(method, steps, make):
    """In float64, so that the comparison sees the method and not float32 rounding (torchdiffeq
    takes a post-activation step as ``x + h ((relu(x + h F) - x) / h)``, the fast path as the
    block does, ``relu(x + h F)``: they differ by about 1e-6 in float32)."""
    exported = export_neural_ode(make().double(), method=method, steps=steps)
    with torch.no_grad():
        for stage in stages(exported):
            width = stage.field.template.block.conv1.in_channels
            state = torch.randn(2, width, 8, 8, dtype=torch.float64).abs()
            assert relative(stage(state), torchdiffeq_solution(stage, state)) <= 1e-10


def test_cached_weights_follow_optimizer_steps_and_loads():
    model = small_ode_resnet()
    exported = export_neural_ode(model, method="rk4", steps=3)
    (stage,) = stages(exported)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        before = stage(x)
    optimizer = torch.optim.SGD(exported.parameters(), lr=0.5)
    exported.train()
    stage(x).square().mean().backward()
    optimizer.step()
    exported.eval()
    with torch.no_grad():
        after = stage(x)
        assert relative(after, torchdiffeq_solution(stage, x)) <= 1e-6
        assert relative(after, before) > 1e-3
        fresh = export_neural_ode(model, method="rk4", steps=3)
        exported.load_state_dict(fresh.state_dict())
        torch.testing.assert_close(stage(x), before)


@pytest.mark.parametrize("method", ["euler", "heun3", "rk4"])
@pytest.mark.parametrize("make", ["ode_resnet", "resnet50"])
def test_recursive_gradients_equal_backprop_in_float64(method, make):
    source = (
        small_ode_resnet()
        if make == "ode_resnet"
        else randomize_norms(torchvision_resnet("resnet50", num_classes=10)).eval()
    )
    grads = {}
    data = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for gradient in ("backprop", "recursive"):
        exported = export_neural_ode(source.double(), method=method, gradient=gradient)
        for stage in stages(exported):
            stage.checkpoints = 2
        x = data.clone().requires_grad_()
        exported(x).square().sum().backward()
        grads[gradient] = [x.grad] + [p.grad for p in exported.parameters()]
    for recursive, backprop in zip(grads["recursive"], grads["backprop"]):
        assert relative(recursive, backprop) <= 1e-10


def test_binomial_checkpointing_recomputes_as_planned():
    calls = []
    weight = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def step(k: int, x: torch.Tensor) -> torch.Tensor:
        calls.append(k)
        return torch.tanh(weight * x) + 0.1 * k

    def gradients(run) -> list[torch.Tensor]:
        x = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
        weight.grad = None
        run(x).sum().backward()
        return [x.grad, weight.grad]

    def reference(x):
        for k in range(20):
            x = step(k, x)
        return x

    expected = gradients(reference)
    calls.clear()
    got = gradients(lambda x: binomial_checkpoint(step, x, 20, 3, [weight]))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert len(calls) == 20 + recomputations(20, 3)
