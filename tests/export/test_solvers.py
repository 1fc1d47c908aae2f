"""One solver table, read from torchdiffeq: every method it offers that the export claims runs,
at its order, against a float64 reference; a method torchdiffeq adds needs no edit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

from resode_lightning import deployable, export_neural_ode, ode_resnet
from resode_lightning.export.anytime import field_evaluations
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.options import PiecewiseLinear
from resode_lightning.export.solvers import ADAPTIVE_METHODS, FIXED_METHODS, METHODS
from resode_lightning.testing import randomize_norms

SMOOTH = PiecewiseLinear(knots=2)
"""One linear piece per stage: with GELU blocks the field is smooth in t and x, so every
one-step method converges at its order."""


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 model, an input, and the solution of its ODE to about 1e-9 (dopri8, 1e-11)."""
    source = ode_resnet(depths=(4,), widths=(4,), init="iid", seed=0, activation="gelu")
    model = randomize_norms(source).double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = export_neural_ode(
        model, method="dopri8", rtol=1e-11, atol=1e-11, interpolation=SMOOTH
    )
    with torch.no_grad():
        return model, x, reference(x)


def test_the_table_is_torchdiffeq_s():
    seen: set[type] = set()
    for name, cls in SOLVERS.items():
        if cls in seen:  # an alias (fixed_adams): offered under its first name only
            assert name not in METHODS
            continue
        seen.add(cls)
        if issubclass(cls, (RKAdaptiveStepsizeODESolver, FixedGridODESolver)):
            assert METHODS[name].order == cls.order
            assert METHODS[name].adaptive == issubclass(cls, RKAdaptiveStepsizeODESolver)
        else:  # scipy_solver: leaves torch (no gradients, no GPU)
            assert name not in METHODS
    assert {"euler", "midpoint", "rk4", "dopri5"} <= set(METHODS)
    assert set(FIXED_METHODS) | set(ADAPTIVE_METHODS) == set(METHODS)
    assert {"euler", "midpoint", "rk4"} <= set(GRID_METHODS) <= set(FIXED_METHODS)
    if "heun3" in SOLVERS:
        assert GRID_METHODS["heun3"] == (0.0, 1 / 3, 2 / 3)
    assert METHODS["rk4"].tableau.b == (1 / 8, 3 / 8, 3 / 8, 1 / 8)  # torchdiffeq's 3/8 rule
    assert METHODS["implicit_adams"].tableau is None  # multistep: runs on torchdiffeq


@pytest.mark.parametrize("method", FIXED_METHODS)
def test_evaluations_per_step_are_what_torchdiffeq_evaluates(method):
    calls = []

    def field(t, y):
        calls.append(float(t))
        return -y

    steps = 8
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    odeint(field, torch.ones(2, dtype=torch.float64), times, method=method)
    per_step = METHODS[method].evaluations
    if per_step is None:  # a multistep method: its count is not fixed
        assert METHODS[method].tableau is None
    else:
        assert len(calls) == per_step * steps
        model = export_neural_ode(ode_resnet(depths=(3,), widths=(4,)), method=method, steps=5)
        assert field_evaluations(model) == per_step * 5


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_against_a_float64_reference(method, problem):
    """One-step methods converge at the table's order, multistep ones converge, adaptive ones
    meet their tolerance; gradients reach every parameter."""
    model, x, reference = problem
    solver = METHODS[method]
    if solver.adaptive:
        options = {"rtol": 1e-6, "atol": 1e-6}
        export = export_neural_ode(model, method=method, interpolation=SMOOTH, **options)
        with torch.no_grad():
            assert relative(export(x), reference) <= 2e-4  # measured 4e-5 (fehlberg2)
    else:
        counts = (4, 8, 16) if solver.tableau is not None else (16, 64)
        errors = []
        for steps in counts:
            export = export_neural_ode(model, method=method, steps=steps, interpolation=SMOOTH)
            with torch.no_grad():
                errors.append(relative(export(x), reference))
        if solver.tableau is not None:
            observed = math.log2(errors[-2] / errors[-1])
            assert abs(observed - solver.order) <= 0.25, (errors, observed)
        else:  # Adams: measured 1e-2 and 6e-4 at 16 steps, 1e-4 and 4e-6 at 64
            assert errors[-1] <= 2e-4 and errors[-1] <= errors[0] / 20, errors
    export.train()
    export(x).square().sum().backward()
    assert all(p.grad is not None for p in export.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", list(GRID_METHODS))
def test_every_grid_method_deploys_and_is_captured(method, problem):
    model, x, _ = problem
    export = export_neural_ode(model, method=method, steps=3)
    program = deployable(export)
    with torch.no_grad():
        expected = export(x)
        assert relative(program(x), expected) <= 1e-12
        captured = torch.export.export(program, (x,)).module()
        assert relative(captured(x), expected) <= 1e-12


RALSTON = """
import json, sys
import torch
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import rk2_step_func
from torchdiffeq._impl.solvers import FixedGridODESolver


class Ralston(FixedGridODESolver):
    order = 2

    def _step_func(self, func, t0, dt, t1, y0):
        f0 = func(t0, y0)
        tableau = [[0.0, 0.0, 0.0], [2 / 3, 2 / 3, 0.0], [0.0, 1 / 4, 3 / 4]]
        return rk2_step_func(func, t0, dt, t1, y0, butcher_tableu=tableau, f0=f0), f0


SOLVERS["ralston"] = Ralston  # as a torchdiffeq release would add it
SOLVERS["ralston_alias"] = Ralston

from resode_lightning import export_neural_ode, ode_resnet
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.solvers import METHODS

model = ode_resnet(depths=(4,), widths=(4,), activation="gelu").double().eval()
export = export_neural_ode(model, method="ralston", steps=3)
stage = next(m for m in export.modules() if type(m).__name__ == "NeuralODEStage")
x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
with torch.no_grad():
    grid = stage(x)
    solved = stage._solve(stage._func(x), x, x.new_zeros(()), stage.horizon, 3)
json.dump({
    "solver": repr(METHODS["ralston"]),
    "grid": GRID_METHODS["ralston"],
    "alias": "ralston_alias" in METHODS,
    "difference": float((grid - solved).abs().max() / solved.abs().max()),
}, sys.stdout)
"""


def test_a_solver_torchdiffeq_adds_needs_no_edit():
    """Ralston's method registered in torchdiffeq before import: read, run on the grid, and
    equal to torchdiffeq's own solve on the same grid."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RALSTON)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert found["solver"] == (
        "Solver(name='ralston', order=2, adaptive=False, tableau=Tableau(c=(0.0, "
        "0.6666666666666666), a=((), (0.6666666666666666,)), b=(0.25, 0.75)))"
    )
    assert found["grid"] == [0.0, 2 / 3]
    assert not found["alias"]
    assert found["difference"] <= 1e-12
