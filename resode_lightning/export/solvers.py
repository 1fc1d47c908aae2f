"""torchdiffeq's solvers, described once: order, evaluations per step, fixed grid or adaptive.

Everything here is read from torchdiffeq (its ``SOLVERS`` table and solver classes), so a method
it adds needs no edit in this package:

- **adaptive**: a Runge-Kutta solver with error control (``RKAdaptiveStepsizeODESolver``), which
  takes the knot times of a weight path as ``step_t``/``jump_t``;
- **fixed-grid**: a ``FixedGridODESolver``. Its Butcher tableau is read off one step taken on a
  probe field (stage ``i`` returns the ``i``-th unit vector, so each stage's input and the step
  hold the tableau's coefficients), then confirmed on a nonlinear field over
  :data:`PROBE_STEPS` steps. A method that is not one explicit Runge-Kutta step, such as the
  Adams multistep methods after their Runge-Kutta start, has no tableau: torchdiffeq runs it,
  and its evaluations per step are not fixed.

Other entries are not offered: aliases of a solver already listed (``fixed_adams``) and solvers
that leave torch (``scipy_solver``: no gradients, no GPU).

Example::

    >>> METHODS["rk4"].order, METHODS["rk4"].evaluations, METHODS["rk4"].tableau.c
    (4, 4, (0.0, 0.3333333333333333, 0.6666666666666666, 1.0))
    >>> METHODS["dopri5"].adaptive, METHODS["implicit_adams"].evaluations
    (True, None)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

MAX_STAGES = 32
"""The most stages a tableau is read for; a fixed-grid step evaluating the field more often
runs on torchdiffeq."""
PROBE_STEPS = 16
"""Steps over which a tableau must reproduce its solver (a multistep method departs from its
start-up steps after a few)."""
_AGREEMENT = 1e-12
"""Largest relative difference, in float64, between a solver's step and its tableau's."""


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta step: stage ``i`` evaluates ``F(t + c[i] h, x + h Σ_j a[i][j]
    k_j)``, and the step is ``x + h Σ_i b[i] k_i``. ``a[i]`` holds the ``i`` coefficients of
    the earlier stages."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]


@dataclass(frozen=True)
class Solver:
    """One torchdiffeq method as the export uses it.

    Attributes:
        name: the method's name in torchdiffeq.
        order: its order of accuracy (torchdiffeq's ``order``).
        adaptive: whether it chooses its own steps from ``rtol`` and ``atol``.
        tableau: its Butcher tableau when each step is one explicit Runge-Kutta step on a fixed
            grid (such methods run on :mod:`resode_lightning.export.grid`), else ``None``.
    """

    name: str
    order: int
    adaptive: bool
    tableau: Tableau | None = None

    @property
    def evaluations(self) -> int | None:
        """Vector-field evaluations per step; ``None`` where it is not fixed (adaptive methods,
        which also reject steps, and multistep ones)."""
        return None if self.tableau is None else len(self.tableau.c)


def solver_table() -> dict[str, Solver]:
    """The methods of torchdiffeq's ``SOLVERS`` that the export runs, in its order; aliases (a
    class already listed) and solvers outside torch are left out."""
    table: dict[str, Solver] = {}
    seen: set[type] = set()
    for name, cls in TORCHDIFFEQ_SOLVERS.items():
        if cls in seen:
            continue
        seen.add(cls)
        if issubclass(cls, RKAdaptiveStepsizeODESolver):
            table[name] = Solver(name, cls.order, adaptive=True)
        elif issubclass(cls, FixedGridODESolver):
            try:
                with torch.device("cpu"):  # whatever default device the caller has set
                    tableau = read_tableau(name)
            except Exception:  # noqa: BLE001 - a solver that cannot step a probe is not offered
                continue
            table[name] = Solver(name, cls.order, adaptive=False, tableau=tableau)
    return table


def read_tableau(method: str) -> Tableau | None:
    """The Butcher tableau of a fixed-grid torchdiffeq method, ``None`` when its steps are not
    all one and the same explicit Runge-Kutta step.

    Raises:
        Exception: whatever torchdiffeq raises when the solver cannot take a step of
            ``odeint(func, y0, t, method=...)`` without options.
    """
    probe = _UnitStages()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a multistep corrector may warn on the probe field
        try:
            start = torch.zeros(MAX_STAGES, dtype=torch.float64)
            times = torch.tensor([0.0, 1.0], dtype=torch.float64)
            step = odeint(probe, start, times, method=method)
        except _TooManyStages:
            return None
        stages = len(probe.times)
        if stages == 0 or bool(step[1, stages:].any()):
            return None
        rows = []
        for i, state in enumerate(probe.inputs):
            if bool(state[i:].any()):  # a stage that reads itself or a later one: implicit
                return None
            rows.append(tuple(state[:i].tolist()))
        tableau = Tableau(tuple(probe.times), tuple(rows), tuple(step[1, :stages].tolist()))
        return tableau if _reproduces(method, tableau) else None


class _TooManyStages(Exception):
    pass


class _UnitStages:
    """A field whose ``i``-th evaluation returns the ``i``-th unit vector, recording its inputs."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.inputs: list[Tensor] = []

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        index = len(self.times)
        if index >= MAX_STAGES:
            raise _TooManyStages
        self.times.append(float(t))
        self.inputs.append(y.clone())
        unit = torch.zeros_like(y)
        unit[index] = 1.0
        return unit


def _nonlinear(t: Tensor, y: Tensor) -> Tensor:
    return torch.sin(y * (1 + t)) + 0.5 * t * y.roll(1) - 0.25 * y.square()


def _reproduces(method: str, tableau: Tableau) -> bool:
    """Whether ``tableau`` takes each of :data:`PROBE_STEPS` steps of ``method`` on a nonlinear
    field, from the state the solver reached."""
    times = torch.arange(PROBE_STEPS + 1, dtype=torch.float64) * 0.125 + 0.25
    start = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    states = odeint(_nonlinear, start, times, method=method)
    for k in range(PROBE_STEPS):
        h = float(times[k + 1] - times[k])
        expected = _tableau_step(tableau, _nonlinear, times[k], h, states[k])
        if float((expected - states[k + 1]).abs().max()) > _AGREEMENT * (
            1 + float(expected.abs().max())
        ):
            return False
    return True


def _tableau_step(
    tableau: Tableau, func: Callable[[Tensor, Tensor], Tensor], t: Tensor, h: float, x: Tensor
) -> Tensor:
    """One step of ``tableau`` from ``x`` at time ``t``, as plainly as written."""
    ks: list[Tensor] = []
    for c, row in zip(tableau.c, tableau.a):
        stage = x + h * sum((w * k for w, k in zip(row, ks) if w), torch.zeros_like(x))
        ks.append(func(t + c * h, stage))
    return x + h * sum((w * k for w, k in zip(tableau.b, ks) if w), torch.zeros_like(x))


METHODS: dict[str, Solver] = solver_table()
"""Every torchdiffeq method the export runs, by name."""
FIXED_METHODS: tuple[str, ...] = tuple(name for name, s in METHODS.items() if not s.adaptive)
"""Methods stepping a fixed grid of ``steps`` equal steps."""
ADAPTIVE_METHODS: tuple[str, ...] = tuple(name for name, s in METHODS.items() if s.adaptive)
"""Methods choosing their own steps from ``rtol`` and ``atol``."""
