"""Fixed-grid integration of a stage's field with its weights materialised at the grid's times.

torchdiffeq evaluates the field at times it computes as tensors, which makes every evaluation
interpolate every weight tensor and swap it into the template. On a fixed grid the evaluation
times are known in advance: :class:`FieldOnGrid` binds the weights of each time to one copy of
the branch module, once while the parameters keep their version (inference) or once per forward
(training), so a step costs what the block costs. On-grid Euler uses the blocks' own weights
(views of the knots), and a post-activation step is computed as the block computes it,
``P(x + h F(x))``. The methods below follow torchdiffeq's arithmetic (``rk4`` is its 3/8 rule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from resode_lightning.export.field import VectorField

GRID_METHODS: dict[str, tuple[float, ...]] = {
    "euler": (0.0,),
    "midpoint": (0.0, 0.5),
    "rk4": (0.0, 1 / 3, 2 / 3, 1.0),
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
        self._times: list[float] = []
        self._horizon_key: tuple | None = None
        self._weights_key: tuple | None = None
        self._modules: list[nn.Module] = []

    def bind(self, horizon: Tensor) -> None:
        """Materialise the weights at every evaluation time, unless they are current.

        Reads ``horizon`` on the host only when it changed (a load), never per step.
        """
        horizon_key = (id(horizon), horizon._version, horizon.data_ptr())
        if horizon_key != self._horizon_key:
            self.step_size = horizon.item() / self.steps
            fractions = GRID_METHODS[self.method]
            self._times = [(k + f) * self.step_size for k in range(self.steps) for f in fractions]
            self._horizon_key, self._weights_key = horizon_key, None
        tensors = self.field.path.tensors()
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        key = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        if not grad and key == self._weights_key:
            return
        if len(self._modules) != len(self._times):
            self._modules = [self.field.branch_module() for _ in self._times]
        for module, weights in zip(self._modules, self.field.path.at(self._times)):
            self.field.bind(module, weights)
        self._weights_key = None if grad else key

    def branch(self, index: int) -> Callable[[Tensor], Tensor]:
        """``x -> F(t_index, x)``: the unprojected field at evaluation time ``index``."""
        module, scale = self._modules[index], self.field.scale
        if scale == 1.0:
            return module
        return lambda x: module(x) * scale

    def step(self, k: int, x: Tensor) -> Tensor:
        """The state after step ``k`` from ``x``."""
        h, post = self.step_size, self.field.post
        first = len(GRID_METHODS[self.method]) * k
        if self.method == "euler":
            out = x + h * self.branch(first)(x)
            return post(out) if post is not None else out

        def func(index: int, y: Tensor) -> Tensor:
            value = self.branch(first + index)(y)
            return value if post is None else (post(y + h * value) - y) / h

        k1 = func(0, x)
        if self.method == "midpoint":
            return x + h * func(1, x + k1 * (0.5 * h))
        k2 = func(1, x + h * k1 * (1 / 3))
        k3 = func(2, x + h * (k2 - k1 * (1 / 3)))
        k4 = func(3, x + h * (k1 - k2 + k3))
        return x + (k1 + 3 * (k2 + k3) + k4) * h * 0.125
