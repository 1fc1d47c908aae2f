"""Weights as functions of depth: knots, interpolation and least-squares knot fitting.

Block ``k`` of a stage of ``L`` blocks on ``[0, horizon]`` sits at ``t_k = k * horizon / L``,
the left end of its Euler step, so that a path evaluated on the original grid returns the
original weights exactly. Every function here is pure tensor code (no Lightning, no modules)
and takes ``t`` as a tensor without synchronising with the device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Interpolation = Literal["constant", "linear"]
INTERPOLATIONS: tuple[str, ...] = ("constant", "linear")


def knot_times(count: int, horizon: float = 1.0, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Left ends ``k * horizon / count`` of the steps of a uniform grid on ``[0, horizon]``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return torch.arange(count, dtype=dtype) * (horizon / count)


def interpolate(
    values: Tensor, times: Tensor, t: Tensor | float, mode: Interpolation = "linear"
) -> Tensor:
    """Evaluate the path through ``(times[i], values[i])`` at ``t``.

    Args:
        values: knot values, shape ``(m, *shape)``.
        times: increasing knot times, shape ``(m,)``.
        t: a time (0-d) or times (1-d); outside ``[times[0], times[-1]]`` the path is constant.
        mode: ``"constant"`` (the value of the last knot at or before ``t``) or ``"linear"``.

    Returns:
        The path's value(s), shape ``(*shape)`` for a 0-d ``t``, ``(len(t), *shape)`` otherwise.
    """
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {mode!r}")
    if values.shape[0] != times.shape[0]:
        raise ValueError(f"{values.shape[0]} knot values but {times.shape[0]} knot times")
    t = torch.as_tensor(t, dtype=times.dtype if isinstance(t, float) else None)
    # a time within rounding of a knot is that knot: a float32 solver time k * h lands on
    # block k, not on a blend of its neighbours
    eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
    tolerance = torch.maximum(4 * eps * times.abs().amax(), 1e-6 * (times[-1] - times[0]))
    t = t.to(times.device, times.dtype)
    scalar = t.dim() == 0
    t = t.reshape(-1)  # indexing with a 0-d tensor would read it on the host: keep it 1-d
    count = times.shape[0]
    if count == 1:
        path = values[:1].expand(t.shape[0], *values.shape[1:])
    elif mode == "constant":
        index = (torch.searchsorted(times, t + tolerance, right=True) - 1).clamp(0, count - 1)
        path = values.index_select(0, index)
    else:
        index = (torch.searchsorted(times, t + tolerance, right=True) - 1).clamp(0, count - 2)
        t0, t1 = times.index_select(0, index), times.index_select(0, index + 1)
        offset = (t - t0).where((t - t0).abs() > tolerance, 0.0)
        weight = (offset / (t1 - t0)).clamp(0.0, 1.0).to(values.dtype)
        weight = weight.reshape(weight.shape + (1,) * (values.dim() - 1))
        path = torch.lerp(values.index_select(0, index), values.index_select(0, index + 1), weight)
    return path[0] if scalar else path


def hat_basis(times: Tensor, knots: Tensor) -> Tensor:
    """``B[i, j]``: the piecewise-linear interpolant's weight of knot ``j`` at ``times[i]``."""
    eye = torch.eye(knots.shape[0], dtype=times.dtype, device=times.device)
    return interpolate(eye, knots, times, "linear")


def fit_knots(values: Tensor, times: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Least-squares fit of a linear path with ``count`` equally spaced knots to ``values``.

    The knots span ``[times[0], times[-1]]``; with ``count == len(times)`` on a uniform grid
    the fit reproduces ``values`` exactly.

    Returns:
        ``(knot_values, knot_times)`` of shapes ``(count, *shape)`` and ``(count,)``.
    """
    length = values.shape[0]
    if not 2 <= count <= length:
        raise ValueError(
            f"knots must be between 2 and the stage depth {length}, got {count}; "
            f"use knots=None to keep one knot per block"
        )
    knots = torch.linspace(float(times[0]), float(times[-1]), count, dtype=torch.float64)
    basis = hat_basis(times.to(torch.float64), knots)
    flat = values.reshape(length, -1).to(torch.float64)
    # the least-squares operator is found on the host (a small (count, length) matrix) and
    # applied where the values are, the meta device included (a layout check builds nothing)
    identity = torch.eye(length, dtype=torch.float64)
    solution = torch.linalg.lstsq(basis, identity).solution.to(flat.device) @ flat
    return solution.reshape(count, *values.shape[1:]).to(values.dtype), knots.to(times.dtype)
