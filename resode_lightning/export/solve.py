"""The ODE stage: a residual stage as a vector field solved by torchdiffeq on ``[0, horizon]``.

Four ways to differentiate the solve:

- ``"backprop"``: through the solver's operations (memory grows with the steps);
- ``"checkpoint"``: ``torch.utils.checkpoint`` around each solver step (each knot interval for
  adaptive methods): only the state at each step is kept, one step is recomputed at a time in
  backward; gradients equal backprop's to rounding;
- ``"recursive"``: binomial checkpointing over the solver steps (fixed-grid methods): at most
  ``checkpoints`` stored states whatever the steps, gradients equal backprop's to rounding, at
  the cost of recomputed steps (:mod:`resode_lightning.export.revolve`);
- ``"adjoint"``: torchdiffeq's ``odeint_adjoint`` with the path's parameters as
  ``adjoint_params`` and only ``[0, horizon]`` requested: memory constant in the steps, but the
  gradient is that of the continuous adjoint, reconstructed backwards in time.

Fixed-grid Runge-Kutta methods (euler, midpoint, rk4, ...:
:data:`~resode_lightning.export.grid.GRID_METHODS`) run on :mod:`resode_lightning.export.grid`
(weights bound once per parameter version, no per-step host sync); torchdiffeq solves the other
methods and the adjoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchdiffeq import odeint, odeint_adjoint

from resode_lightning.export.field import VectorField, float64_kept
from resode_lightning.export.grid import GRID_METHODS, FieldOnGrid
from resode_lightning.export.revolve import binomial_checkpoint, default_checkpoints
from resode_lightning.export.solvers import METHODS

GRADIENTS: tuple[str, ...] = ("backprop", "checkpoint", "recursive", "adjoint")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _UniformGrid:
    """torchdiffeq ``grid_constructor``: ``steps`` equal steps between the requested end times."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, func: object, y0: Tensor, t: Tensor) -> Tensor:
        fraction = torch.arange(self.steps + 1, dtype=torch.float64, device=t.device) / self.steps
        grid = (t[0].double() + (t[-1].double() - t[0].double()) * fraction).to(t.dtype)
        return torch.cat([t[:1], grid[1:-1], t[-1:]])


class _Projected(nn.Module):
    """The field as torchdiffeq calls it, projected at a fixed resolution (the solver's step)."""

    def __init__(self, field: nn.Module, resolution: Tensor | None) -> None:
        super().__init__()
        self.field = field
        self.resolution = resolution

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.field(t, x, self.resolution)


class NeuralODEStage(nn.Module):
    """A residual stage as a neural ODE ``dx/dt = F(t, x)`` on ``[0, horizon]`` (torchdiffeq).

    Args:
        field: the stage's vector field.
        horizon: end time of the solve.
        method: a torchdiffeq method of :data:`~resode_lightning.export.solvers.METHODS`:
            fixed-grid or adaptive.
        steps: number of equal steps of a fixed-grid method (``None`` for adaptive ones).
        gradient: ``"backprop"``, ``"checkpoint"``, ``"recursive"`` or ``"adjoint"``.
        checkpoints: stored states of ``gradient="recursive"``, at most the steps; ``None``:
            ``⌈log2 steps⌉ + 1``, which recomputes about ``log2(steps) / 2`` forward passes (63
            steps recomputed for 36 steps, 738 for 256).
        rtol: relative tolerance of adaptive methods.
        atol: absolute tolerance of adaptive methods.
        compile: evaluate the field through ``torch.compile`` (the field only, not the solver).
        source_depth: the number of blocks ``L`` of the source stage (``steps`` given as a
            fraction are a fraction of it, see :func:`resode_lightning.export.anytime.set_steps`).
        stage_name: the name of the source stage (:attr:`~resode_lightning.core.stages.Stage.name`).
        stochastic: the source blocks' dropout and drop-path layers, described; the field
            cannot apply them, so a training-mode forward is refused when there are any.

    ``method`` and ``steps`` may be changed between calls (see
    :mod:`resode_lightning.export.anytime`): the weights bound for each fixed grid are kept, so
    switching back and forth costs no re-binding.

    The input's dtype is kept. Under autocast a float16/bfloat16 state is integrated in float32
    while the field's layers run in the autocast dtype; outside autocast, adaptive methods refuse
    a float16/bfloat16 state.
    """

    def __init__(
        self,
        field: VectorField,
        horizon: float,
        *,
        method: str,
        steps: int | None,
        gradient: str,
        rtol: float,
        atol: float,
        checkpoints: int | None = None,
        compile: bool = False,
        source_depth: int | None = None,
        stage_name: str | None = None,
        stochastic: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.field = field
        self.register_buffer("horizon", torch.tensor(float(horizon), dtype=torch.float64))
        self.method = method
        self.steps = steps
        self.gradient = gradient
        self.rtol = rtol
        self.atol = atol
        self.checkpoints = checkpoints
        self.compile = compile
        self.source_depth = source_depth
        self.stage_name = stage_name
        self.stochastic = stochastic
        object.__setattr__(self, "_compiled", None)
        object.__setattr__(self, "_grids", {})

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NeuralODEStage:
        with float64_kept(self, "horizon", fn):
            return super()._apply(fn, recurse)

    @property
    def adaptive(self) -> bool:
        return METHODS[self.method].adaptive

    def _func(self, x: Tensor) -> nn.Module:
        field = self.field
        if self.compile:
            if self._compiled is None:
                object.__setattr__(self, "_compiled", torch.compile(self.field))
            field = self._compiled
        resolution = None if self.adaptive else (self.horizon / self.steps).to(x.device, x.dtype)
        return _Projected(field, resolution)

    def _options(self, start: Tensor, stop: Tensor, steps: int | None) -> dict[str, object]:
        if not self.adaptive:
            return {"grid_constructor": _UniformGrid(steps)}
        times = self.field.path.times.to(start.device, start.dtype)
        inside = times[(times > start) & (times < stop)]
        if inside.numel() == 0:
            return {}
        kind = "step_t" if self.field.path.interpolation == "linear" else "jump_t"
        return {kind: inside}

    def _solve(
        self, func: nn.Module, x: Tensor, start: Tensor, stop: Tensor, steps: int | None
    ) -> Tensor:
        t = torch.stack([start, stop])
        options = self._options(start, stop, steps)
        kwargs = {"rtol": self.rtol, "atol": self.atol, "method": self.method, "options": options}
        if self.gradient == "adjoint" and torch.is_grad_enabled():
            params = tuple(p for p in self.field.parameters() if p.requires_grad)
            return odeint_adjoint(func, x, t, adjoint_params=params, **kwargs)[-1]
        return odeint(func, x, t, **kwargs)[-1]

    def _segments(self, x: Tensor) -> list[tuple[Tensor, Tensor, int | None]]:
        """The intervals checkpointed one at a time: solver steps, or knot intervals (adaptive)."""
        horizon = self.horizon.to(x.device, x.dtype)
        if not self.adaptive:
            bounds = (
                horizon
                * torch.arange(self.steps + 1, device=x.device, dtype=torch.float64).to(x.dtype)
                / self.steps
            )
            return [(bounds[i], bounds[i + 1], 1) for i in range(self.steps)]
        bounds = torch.cat([self.field.path.times.to(x.device, x.dtype), horizon[None]])
        return [(bounds[i], bounds[i + 1], None) for i in range(bounds.shape[0] - 1)]

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            raise RuntimeError(
                f"stage {self.stage_name!r} solves with weights cached per grid, which graph "
                f"capture cannot follow: capture resode_lightning.deployable(model) instead (the "
                f"same function on a fixed grid, as plain modules)"
            )
        if self.training and self.stochastic:
            raise ValueError(
                f"stage {self.stage_name!r} of the source is random in training "
                f"({', '.join(self.stochastic[:3])}{', …' if len(self.stochastic) > 3 else ''}), "
                f"which its exported field does not apply: training the export would drop that "
                f"regularisation silently. Export a source built without it (timm: "
                f"drop_path_rate=0, drop_rate=0), or run the export in eval mode"
            )
        dtype = x.dtype
        state = x
        if dtype in _LOW_PRECISION:
            if torch.is_autocast_enabled(x.device.type):
                state = x.float()
            elif self.adaptive:
                raise ValueError(
                    f"{self.method} cannot integrate a {dtype} state: its step size underflows at "
                    f"this precision. Keep the model in float32 and use torch.autocast, or use a "
                    f"fixed-grid method (euler, rk4)."
                )
        grad = torch.is_grad_enabled()
        if (
            self.method in GRID_METHODS
            and not self.compile
            and not (self.gradient == "adjoint" and grad)
        ):
            return self._integrate_on_grid(state, grad).to(dtype)
        func = self._func(state)
        try:
            if self.gradient == "checkpoint" and grad:
                for start, stop, steps in self._segments(state):
                    state = checkpoint(
                        self._step,
                        func,
                        state,
                        start,
                        stop,
                        steps,
                        use_reentrant=False,
                        preserve_rng_state=False,
                    )
            else:
                zero = state.new_zeros(())
                steps = self.steps
                state = self._solve(
                    func, state, zero, self.horizon.to(state.device, state.dtype), steps
                )
        except AssertionError as error:
            if "underflow in dt" not in str(error):
                raise
            raise RuntimeError(
                _underflow_message(self.method, self.rtol, self.atol, state.device.type)
            ) from None
        return state.to(dtype)

    def _integrate_on_grid(self, x: Tensor, grad: bool) -> Tensor:
        grid = self._grids.get((self.method, self.steps))
        if grid is None:
            grid = FieldOnGrid(self.field, self.method, self.steps)
            self._grids[(self.method, self.steps)] = grid
        grid.bind(self.horizon)
        if grad and self.gradient == "recursive":
            checkpoints = min(self.checkpoints or default_checkpoints(self.steps), self.steps)
            params = [p for p in self.field.parameters() if p.requires_grad]
            return binomial_checkpoint(grid.step, x, self.steps, checkpoints, params)
        for k in range(self.steps):
            if grad and self.gradient == "checkpoint":
                x = checkpoint(grid.step, k, x, use_reentrant=False, preserve_rng_state=False)
            else:
                x = grid.step(k, x)
        return x

    def _step(
        self, func: nn.Module, x: Tensor, start: Tensor, stop: Tensor, steps: int | None
    ) -> Tensor:
        return self._solve(func, x, start, stop, steps).clone()

    def extra_repr(self) -> str:
        grid = (
            f"steps={self.steps}"
            if not self.adaptive
            else f"rtol={self.rtol:g}, atol={self.atol:g}"
        )
        horizon = float(self.horizon)
        return f"method={self.method}, {grid}, gradient={self.gradient}, horizon={horizon:g}"


def _underflow_message(method: str, rtol: float, atol: float, device_type: str) -> str:
    message = f"{method} could not meet rtol={rtol:g}, atol={atol:g}: its step size underflowed"
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return (
            f"{message}. Under autocast the field runs in {dtype}, whose rounding "
            f"(eps {torch.finfo(dtype).eps:.1e}) is above these tolerances: raise rtol/atol "
            f"above it, "
            f"use a fixed-grid method (euler, rk4), or disable autocast around the stage."
        )
    return f"{message}; raise rtol/atol or use a fixed-grid method."
