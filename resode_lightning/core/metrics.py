"""Smoothness of weights across depth: pure metric functions on stacked block parameters.

For blocks ``k = 1 … L`` with parameters ``θ_k`` (Frobenius norms; ``docs/theory.md``,
"Smoothness metrics"):

============================  ===============================================
``weight_norm``               ``max_k ||θ_k||``
``lipschitz``                 ``L · max_k ||θ_{k+1} - θ_k||``
``total_variation``           ``Σ_k ||θ_{k+1} - θ_k||``
``relative_roughness``        ``mean_k ||θ_{k+1} - θ_k|| / (√2 · rms_k ||θ_k||)`` (0 for zeros)
``curvature``                 ``L² · max_k ||θ_{k+1} - 2θ_k + θ_{k-1}||`` (NaN when L < 3)
============================  ===============================================

Everything is computed on the tensors' device with no host synchronisation, except
:func:`smoothness_report`, which returns Python numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from resode_lightning.core.parameters import stage_parameters
from resode_lightning.core.resample import blocks_at_depth
from resode_lightning.core.stages import Stage, find_stages, run_stage

METRICS: tuple[str, ...] = (
    "weight_norm",
    "lipschitz",
    "total_variation",
    "relative_roughness",
    "curvature",
)
ALL = "all"
"""Key of the metrics computed on all of a block's parameters as one vector."""


def squared_profiles(stacked: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per name (and for :data:`ALL`), squared norms of ``θ_k``, first and second differences.

    Args:
        stacked: ``{name: tensor of shape (L, *shape)}``, one row per block.

    Returns:
        ``{name: (norms² (L,), first² (L-1,), second² (L-2,))}`` in float32 or wider,
        differentiable in ``stacked`` (a roughness penalty backpropagates through them).
    """
    profiles: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name, values in stacked.items():
        flat = values.reshape(values.shape[0], -1)
        if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        first = flat[1:] - flat[:-1]
        second = first[1:] - first[:-1]
        profiles[name] = (flat.square().sum(1), first.square().sum(1), second.square().sum(1))
    if profiles:
        parts = zip(*profiles.values(), strict=True)
        profiles[ALL] = tuple(torch.stack(part).sum(0) for part in parts)
    return profiles


def metrics_from_profiles(norms2: Tensor, first2: Tensor, second2: Tensor) -> dict[str, Tensor]:
    """The metrics of the module docstring from squared-norm profiles of one parameter set.

    The profiles run along the last dimension; leading dimensions (several parameter sets
    at once) are kept, so each metric has the shape ``norms2.shape[:-1]``.
    """
    depth = norms2.shape[-1]
    steps = first2.sqrt()
    nan = torch.full(norms2.shape[:-1], math.nan, dtype=norms2.dtype, device=norms2.device)
    return {
        "weight_norm": norms2.amax(-1).sqrt(),
        "lipschitz": depth * steps.amax(-1),
        "total_variation": steps.sum(-1),
        "relative_roughness": _ratio(steps.mean(-1), math.sqrt(2) * norms2.mean(-1).sqrt()),
        "curvature": depth**2 * second2.amax(-1).sqrt() if depth >= 3 else nan,
    }


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, 0 where both are 0 (a tensor that is 0 in every block)."""
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(numerator))


def smoothness_metrics(stacked: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """All metrics, per parameter name and for :data:`ALL` parameters as one vector.

    Args:
        stacked: ``{name: tensor of shape (L, *shape)}`` with ``L >= 2``.

    Returns:
        ``{name_or_all: {metric: 0-d tensor}}``, tensors on the input's device.
    """
    if not stacked:
        raise ValueError("no parameters to measure")
    depth = next(iter(stacked.values())).shape[0]
    if depth < 2:
        raise ValueError(f"smoothness across depth needs at least 2 blocks, got {depth}")
    profiles = squared_profiles(stacked)
    return {name: metrics_from_profiles(*parts) for name, parts in profiles.items()}


@torch.no_grad()
def metric_table(
    tensors: Mapping[str, Sequence[Tensor]], lifts: Mapping[str, float] | None = None
) -> tuple[Tensor, Tensor]:
    """All metrics of one stage at once, from per-name lists of block tensors.

    The batched counterpart of :func:`smoothness_metrics` for a training loop: norms of the
    tensors, of their first and of their second differences are taken with a handful of
    multi-tensor kernels whatever the number of names and blocks, with no stacking copy.

    Args:
        tensors: ``{name: [θ_1, …, θ_L]}``, the same ``L >= 2`` for every name.
        lifts: ``{name: lift}``: ``θ`` counts as ``lift · θ`` (ODE parametrisation; see
            :func:`~resode_lightning.core.parameters.ode_lifts`).

    Returns:
        ``(table, profile)``: ``table`` of shape ``(1 + len(tensors), len(METRICS))`` in float32,
        row 0 for :data:`ALL` then one row per name in order, columns in :data:`METRICS` order;
        ``profile``: ``||θ_{k+1} - θ_k||`` of all parameters as one vector, shape ``(L-1,)``.
    """
    names = list(tensors)
    if not names:
        raise ValueError("no parameters to measure")
    depth = len(tensors[names[0]])
    if depth < 2 or any(len(tensors[name]) != depth for name in names):
        raise ValueError(f"every name needs the same number (>= 2) of blocks, got {depth}")
    lifts = lifts or {}
    factors = [abs(lifts.get(name, 1.0)) for name in names]
    rows = len(names)

    def norms(values: list[Tensor], count: int) -> Tensor:
        if count == 0:
            return torch.zeros(rows, 0, device=tensors[names[0]][0].device)
        result = torch._foreach_norm(values, 2, dtype=torch.float32)
        result = torch._foreach_mul(result, [f for f in factors for _ in range(count)])
        return torch.stack(result).reshape(rows, count).square()

    flat = [t for name in names for t in tensors[name]]
    diffs = torch._foreach_sub(
        [flat[r * depth + k + 1] for r in range(rows) for k in range(depth - 1)],
        [flat[r * depth + k] for r in range(rows) for k in range(depth - 1)],
    )
    seconds = depth - 2
    curls = (
        torch._foreach_sub(
            [diffs[r * (depth - 1) + k + 1] for r in range(rows) for k in range(seconds)],
            [diffs[r * (depth - 1) + k] for r in range(rows) for k in range(seconds)],
        )
        if seconds > 0
        else []
    )
    norms2, first2, second2 = norms(flat, depth), norms(diffs, depth - 1), norms(curls, seconds)
    profiles = [torch.cat([p.sum(0, keepdim=True), p]) for p in (norms2, first2, second2)]
    metrics = metrics_from_profiles(*profiles)
    return torch.stack([metrics[name] for name in METRICS], dim=-1), profiles[1][0].sqrt()


def smoothness_report(
    model: nn.Module, *, per_parameter: bool = False, as_frame: bool = False
) -> list[dict[str, Any]] | Any:
    """The smoothness metrics of every residual stage of ``model``, one row per stage.

    Metrics are those of :data:`METRICS`, in the ODE parametrisation whether or not the model
    has been converted, on all of a block's parameters as one vector.

    Args:
        model: any model with residual stages (a LightningModule holding one works too).
        per_parameter: add one row per parameter name after each stage's row.
        as_frame: return a ``pandas.DataFrame`` (pandas must be installed) instead of a list.

    Returns:
        Rows ``{"stage", "parameter", "depth", "form", "horizon", *METRICS}`` (Python numbers):
        ``parameter`` is ``"all"`` for the stage row, ``form`` is ``"ode"`` or ``"plain"``,
        ``horizon`` is the ODE horizon (1.0 for a plain stage).

    Raises:
        ValueError: ``model`` has no residual stage.
        ImportError: ``as_frame=True`` without pandas.

    Example::

        >>> from torchvision.models import resnet18
        >>> rows = smoothness_report(resnet18())
        >>> [(row["stage"], row["depth"]) for row in rows]  # layer2-4: 1 block after downsampling
        [('layer1', 2)]
    """
    if as_frame:
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "smoothness_report(..., as_frame=True) needs pandas: pip install pandas, "
                "or use the default list of dicts"
            ) from None
    rows: list[dict[str, Any]] = []
    for stage in find_stages(model):
        metrics = smoothness_metrics(stage_parameters(stage))
        names = list(metrics) if per_parameter else [ALL]
        names = [ALL] + [name for name in names if name != ALL]
        for name in names:
            row: dict[str, Any] = {
                "stage": stage.name,
                "parameter": name,
                "depth": stage.depth,
                "form": "ode" if stage.is_ode_form else "plain",
                "horizon": stage.horizon or 1.0,
            }
            row.update({metric: float(value) for metric, value in metrics[name].items()})
            rows.append(row)
    return pandas.DataFrame(rows) if as_frame else rows


@torch.no_grad()
def depth_consistency(stage: Stage, x: Tensor, steps: int | None = None) -> Tensor:
    """The depth-consistency error ``||y_L - y_{L/2}|| / ||y_L||`` of a stage on input ``x``.

    ``y_L`` runs the stage's own ``L`` blocks; ``y_{L/2}`` runs ``steps`` (default ``L // 2``)
    Euler steps whose weights are the stage's weight path interpolated in depth
    (``docs/theory.md``, "Smoothness metrics"). Blocks are evaluated in eval mode
    (normalisation with running statistics); the stage's training flags are left as they were.

    Returns:
        A 0-d float tensor on ``x``'s device.
    """
    steps = max(stage.depth // 2, 1) if steps is None else steps
    blocks = stage.blocks
    modes = [module.training for block in blocks for module in block.modules()]
    try:
        for block in blocks:
            block.eval()
        coarse_blocks = blocks_at_depth(stage, steps)
        for block in coarse_blocks:
            block.eval()
        full = run_stage(stage, x).float()
        coarse = run_stage(stage, x, coarse_blocks).float()
    finally:
        flags = iter(modes)
        for block in blocks:
            for module in block.modules():
                module.training = next(flags)
    return (full - coarse).norm() / full.norm()
