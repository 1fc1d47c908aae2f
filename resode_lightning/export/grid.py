"""Fixed-grid integration of a stage's field with its weights materialised at the grid's times.

torchdiffeq evaluates the field at times it computes as tensors, which makes every evaluation
interpolate every weight tensor and swap it into the template. On a fixed grid the evaluation
times are known in advance: :class:`FieldOnGrid` binds the weights of each time to one copy of
the branch module, once while the parameters keep their version (inference) or once per forward
(training), so a step costs what the block costs. On-grid Euler uses the blocks' own weights
(views of the knots), and a post-activation step is computed as the block computes it,
``P(x + h F(x))``. Every fixed-grid method whose step is one explicit Runge-Kutta step runs
here, with the Butcher tableau read from torchdiffeq (:mod:`resode_lightning.export.solvers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from resode_lightning.export.field import VectorField
from resode_lightning.export.solvers import METHODS

GRID_METHODS: dict[str, tuple[float, ...]] = {
    name: solver.tableau.c for name, solver in METHODS.items() if solver.tableau is not None
}
"""Methods integrated here, with the fractions of a step at which each step evaluates the field."""


class FieldOnGrid:
    """The field's branch at every evaluation time of ``steps`` equal steps on ``[0, horizon]``.

    Args:
        field: the stage's vector field.
        method: one of :data:`GRID_METHODS`.
        steps: the number of steps.
    """

    def __init__(self, field: VectorField, method: str, steps: int) -> None:
        self.field = field
        self.method = method
        self.steps = steps
        self.step_size = 0.0
        self._per_step = len(GRID_METHODS[method])
        self._times: list[float] = []
        self._knot_times: list[float] = []
        self._horizon_key: tuple | None = None
        self._weights_key: tuple | None = None
        self._bound_branches: list[nn.Module] = []
        self._slots: list[nn.Module] = []
        self._per_step_binding = False

    def bind(self, horizon: Tensor) -> None:
        """Prepare the weights for a solve.

        Without gradients, the weights at every evaluation time are materialised once and kept
        while the parameters keep their version. With gradients, each step binds its own
        weights when it runs (:meth:`step`), so that a checkpointed step recomputes them instead
        of keeping them alive until backward. ``horizon`` and the knot times are read on the
        host only when they change (a load), never per step.
        """
        horizon_key = (
            id(horizon),
            horizon._version,
            horizon.data_ptr(),
            self.field.path.times._version,
            self.field.path.times.data_ptr(),
        )
        if horizon_key != self._horizon_key:
            self.step_size = horizon.item() / self.steps
            fractions = GRID_METHODS[self.method]
            self._times = [(k + f) * self.step_size for k in range(self.steps) for f in fractions]
            self._knot_times = self.field.path.times.tolist()
            self._horizon_key, self._weights_key = horizon_key, None
        tensors = self.field.path.tensors()
        self._per_step_binding = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if self._per_step_binding:
            if not self._slots:
                self._slots = [self.field.branch_module() for _ in range(self._per_step)]
            self._weights_key = None
            return
        key = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        if key == self._weights_key:
            return
        bound: dict[int, nn.Module] = {}  # one module per distinct weights (a knot, a blend)
        self._bound_branches = [
            bound.setdefault(id(weights), self.field.bound_branch(weights))
            for weights in self._weights(self._times)
        ]
        self._weights_key = key

    def _weights(self, times: list[float]) -> list[dict[str, Tensor]]:
        return self.field.path.at(times, self._knot_times)

    def _branches(self, k: int) -> list[Callable[[Tensor], Tensor]]:
        """``x -> F(t, x)`` at each evaluation time of step ``k``: the unprojected field."""
        first = self._per_step * k
        if self._per_step_binding:
            modules = self._slots
            times = self._times[first : first + self._per_step]
            for module, weights in zip(modules, self._weights(times)):
                self.field.bind(module, weights)
        else:
            modules = self._bound_branches[first : first + self._per_step]
        scale = self.field.scale
        if scale == 1.0:
            return modules
        return [lambda x, module=module: module(x) * scale for module in modules]

    def step(self, k: int, x: Tensor) -> Tensor:
        """The state after step ``k`` from ``x``."""
        return grid_step(self.method, self._branches(k), self.field.post, self.step_size, x)


def grid_step(
    method: str,
    branches: list[Callable[[Tensor], Tensor]],
    post: Callable[[Tensor], Tensor] | None,
    h: float,
    x: Tensor,
) -> Tensor:
    """One step of size ``h`` of a :data:`GRID_METHODS` method from ``x``.

    ``branches`` are the unprojected field at the step's evaluation times; a post-step map
    projects the field at resolution ``h`` (a one-stage step is ``P(x + h F(x))``, as the block).
    """
    tableau = METHODS[method].tableau
    if len(tableau.b) == 1:
        out = x + h * branches[0](x)
        return post(out) if post is not None else out

    def func(index: int, y: Tensor) -> Tensor:
        value = branches[index](y)
        return value if post is None else (post(y + h * value) - y) / h

    slopes: list[Tensor] = []
    for index, row in enumerate(tableau.a):
        slopes.append(func(index, _combine(x, h, row, slopes)))
    return _combine(x, h, tableau.b, slopes)


def _combine(x: Tensor, h: float, weights: tuple[float, ...], slopes: list[Tensor]) -> Tensor:
    """``x + h Σ w_i k_i``, one fused multiply-add per nonzero weight."""
    for weight, slope in zip(weights, slopes):
        if weight:
            x = torch.add(x, slope, alpha=h * weight)
    return x
