"""Binomial checkpointing: exact gradients through ``n`` steps with ``k`` stored states.

Reversing ``n`` steps with ``s`` free slots splits them at ``m``: the state after the first
``m`` steps takes one slot while the last ``n - m`` steps are reversed with ``s - 1`` slots,
then the first ``m`` are recomputed from their stored input and reversed with ``s`` slots. The
number of recomputed steps obeys

    R(n, s) = min_m  R(n - m, s - 1) + m + R(m, s),    R(1, s) = 0,    R(n, 0) = n (n - 1) / 2,

and the split minimising it is Griewank's binomial (revolve) schedule: with ``s`` slots and
``r`` recomputation sweeps, up to ``C(s + r, s)`` steps can be reversed. The gradient is
backprop's, since the same operations are recomputed.

The schedule runs inside one autograd node, :class:`_Revolve`: its forward sweeps the steps
without recording them, keeping the planned states; its backward replays the schedule from an
explicit stack of ``(state, first step, steps, slots)`` and backpropagates one recorded step at
a time. What backward holds is at most ``k`` states, one step's activations and one gradient
per parameter, whatever the steps (nested reentrant checkpoints instead keep one recomputed
segment's output per nesting level while the inner levels run, which grows with the steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Step = Callable[[int, Tensor], Tensor]
Segment = tuple[Tensor, int, int, int]
"""``(state, first step, steps, free slots)``: steps still to reverse from a stored state."""


def default_checkpoints(steps: int) -> int:
    """``⌈log2 steps⌉ + 1`` stored states (at least 2): see :func:`recomputations` for its cost."""
    return max(2, math.ceil(math.log2(max(steps, 1))) + 1)


@cache
def _plan(steps: int, slots: int) -> tuple[int, int]:
    """``(R(steps, slots), best split m)`` of the module docstring's recurrence."""
    if steps <= 1:
        return 0, 0
    if slots == 0:
        return steps * (steps - 1) // 2, steps - 1
    best = None
    for m in range(1, steps):
        cost = _plan(steps - m, slots - 1)[0] + m + _plan(m, slots)[0]
        if best is None or cost < best[0]:
            best = (cost, m)
    return best


def recomputations(steps: int, checkpoints: int) -> int:
    """Steps recomputed in backward by :func:`binomial_checkpoint` (on top of the ``steps`` of
    the forward pass)."""
    return _plan(steps, checkpoints - 1)[0]


def binomial_checkpoint(
    step: Step, x: Tensor, steps: int, checkpoints: int, params: Sequence[Tensor] = ()
) -> Tensor:
    """``step(steps - 1, … step(1, step(0, x)))``, keeping at most ``checkpoints`` states
    (the input included) plus one step's activations for backward.

    Args:
        step: ``step(k, x)``: the state after step ``k`` from ``x``.
        x: the initial state.
        steps: the number of steps.
        checkpoints: stored states, at least 1 (1: each step is recomputed from ``x``).
        params: the tensors requiring grad that ``step`` uses besides ``x``: the gradient
            reaches these (and ``x``) only, through ``.backward()`` or ``torch.autograd.grad``.
    """
    if checkpoints < 1:
        raise ValueError(f"checkpoints must be >= 1, got {checkpoints}")
    if steps < 1:
        return x
    for slots in range(checkpoints):  # fill the table bottom-up: no deep recursion
        for n in range(1, steps + 1):
            _plan(n, slots)
    return _Revolve.apply(step, steps, checkpoints - 1, x, *params)


def _sweep(step: Step, segment: Segment, pending: list[Segment]) -> tuple[Tensor, Tensor]:
    """Advance through ``segment`` without recording, pushing the planned states onto
    ``pending``, and record its last step: returns that step's input (requiring grad) and
    output."""
    x, start, count, slots = segment
    with torch.no_grad():
        while count > 1:
            split = _plan(count, slots)[1]
            pending.append((x, start, split, slots))
            for k in range(start, start + split):
                x = step(k, x)
            start, count, slots = start + split, count - split, max(slots - 1, 0)
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        return x, step(start, x)


class _Revolve(torch.autograd.Function):
    """The binomial schedule as one autograd node (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, step: Step, steps: int, slots: int, x: Tensor, *params: Tensor) -> Tensor:
        ctx.save_for_backward(*params)
        ctx.step, ctx.pending = step, []
        ctx.autocast = _autocast_state(x.device.type)
        ctx.recorded = _sweep(step, (x.detach(), 0, steps, slots), ctx.pending)
        return ctx.recorded[1].detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        params = [p for p, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[4:]) if needed]
        totals: list[Tensor | None] = [None] * len(params)
        recorded, ctx.recorded = ctx.recorded, None
        with torch.autocast(**ctx.autocast):
            while True:
                x, y = recorded
                grad, *parts = torch.autograd.grad(y, (x, *params), grad, allow_unused=True)
                del recorded, x, y
                for i, part in enumerate(parts):
                    if part is not None:
                        totals[i] = part if totals[i] is None else totals[i] + part
                if not ctx.pending:
                    break
                recorded = _sweep(ctx.step, ctx.pending.pop(), ctx.pending)
        found = iter(totals)
        grads = (next(found) if needed else None for needed in ctx.needs_input_grad[4:])
        return None, None, None, grad if ctx.needs_input_grad[3] else None, *grads


def _autocast_state(device_type: str) -> dict[str, Any]:
    """The autocast settings of ``device_type`` now, to record the steps under them again."""
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }
