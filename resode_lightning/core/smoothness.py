"""Smoothness of weights across depth: pure metric functions on stacked block parameters.

For blocks ``k = 1 … L`` with parameters ``θ_k`` (Frobenius norms, THEORY.md):

============================  ===============================================
``weight_norm``               ``max_k ||θ_k||``
``lipschitz``                 ``L · max_k ||θ_{k+1} - θ_k||``
``total_variation``           ``Σ_k ||θ_{k+1} - θ_k||``
``relative_roughness``        ``mean_k ||θ_{k+1} - θ_k|| / (√2 · rms_k ||θ_k||)``
``curvature``                 ``L² · max_k ||θ_{k+1} - 2θ_k + θ_{k-1}||`` (NaN when L < 3)
============================  ===============================================

Everything is computed on the tensors' device with no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

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
        ``{name: (norms² (L,), first² (L-1,), second² (L-2,))}`` in float32 or wider.
    """
    profiles: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name, values in stacked.items():
        flat = values.detach().reshape(values.shape[0], -1)
        if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        first = flat[1:] - flat[:-1]
        second = first[1:] - first[:-1]
        profiles[name] = (flat.square().sum(1), first.square().sum(1), second.square().sum(1))
    if profiles:
        profiles[ALL] = tuple(torch.stack(parts).sum(0) for parts in zip(*profiles.values()))
    return profiles


def metrics_from_profiles(norms2: Tensor, first2: Tensor, second2: Tensor) -> dict[str, Tensor]:
    """The metrics of the module docstring from squared-norm profiles of one parameter set."""
    depth = norms2.shape[0]
    steps = first2.sqrt()
    nan = torch.full((), math.nan, dtype=norms2.dtype, device=norms2.device)
    return {
        "weight_norm": norms2.max().sqrt(),
        "lipschitz": depth * steps.max(),
        "total_variation": steps.sum(),
        "relative_roughness": steps.mean() / (math.sqrt(2) * norms2.mean().sqrt()),
        "curvature": depth**2 * second2.max().sqrt() if depth >= 3 else nan,
    }


def depth_profile(stacked: Mapping[str, Tensor]) -> Tensor:
    """``||θ_{k+1} - θ_k||`` for every ``k``, all parameters as one vector, shape ``(L-1,)``."""
    return squared_profiles(stacked)[ALL][1].sqrt()


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
    return {name: metrics_from_profiles(*parts) for name, parts in squared_profiles(stacked).items()}
