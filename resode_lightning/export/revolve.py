"""Binomial checkpointing: exact gradients through ``n`` steps with ``k`` stored states.

Reversing ``n`` steps with ``s`` free slots splits them at ``m``: the first ``m`` steps run
inside ``torch.utils.checkpoint`` (only their input is kept), the state after them takes one
slot while the last ``n - m`` steps are reversed recursively with ``s - 1`` slots, then the
first ``m`` are recomputed and reversed with ``s`` slots. The number of recomputed steps obeys

    R(n, s) = min_m  R(n - m, s - 1) + m + R(m, s),    R(1, s) = 0,    R(n, 0) = n (n - 1) / 2,

and the split minimising it is Griewank's binomial (revolve) schedule: with ``s`` slots and
``r`` recomputation sweeps, up to ``C(s + r, s)`` steps can be reversed. The gradient is
backprop's, since the same operations are recomputed. The segments are reentrant checkpoints
(they nest): each leaves one autograd node, so what backward keeps does not grow with the steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Step = Callable[[int, Tensor], Tensor]


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


def binomial_checkpoint(step: Step, x: Tensor, steps: int, checkpoints: int) -> Tensor:
    """``step(steps - 1, … step(1, step(0, x)))``, keeping at most ``checkpoints`` states
    (the input included) plus one step's activations for backward.

    The segments are reentrant checkpoints, so gradients reach the parameters through
    ``.backward()``; ``torch.autograd.grad`` is not supported through them.

    Args:
        step: ``step(k, x)``: the state after step ``k`` from ``x``.
        x: the initial state.
        steps: the number of steps.
        checkpoints: stored states, at least 1 (1: each step is recomputed from ``x``).
    """
    if checkpoints < 1:
        raise ValueError(f"checkpoints must be >= 1, got {checkpoints}")
    for slots in range(checkpoints):  # fill the table bottom-up: no deep recursion
        for n in range(1, steps + 1):
            _plan(n, slots)
    anchor = torch.empty(0, requires_grad=True)  # the segments' output requires grad
    return _reverse(step, x, anchor, 0, steps, checkpoints - 1)


def _reverse(step: Step, x: Tensor, anchor: Tensor, start: int, count: int, slots: int) -> Tensor:
    """Reentrant checkpoints: a segment leaves one autograd node, not one per operation, so
    the bookkeeping kept until backward does not grow with the steps either."""
    if count == 1:
        return step(start, x)
    split = _plan(count, slots)[1]
    middle = checkpoint(
        _segment, step, x, anchor, start, split, slots, use_reentrant=True, preserve_rng_state=False
    )
    return _reverse(step, middle, anchor, start + split, count - split, max(slots - 1, 0))


def _segment(step: Step, x: Tensor, anchor: Tensor, start: int, count: int, slots: int) -> Tensor:
    return _reverse(step, x, anchor, start, count, slots) + anchor.sum()
