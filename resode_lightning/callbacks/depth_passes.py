"""Depth passes
============

The pieces :class:`~resode_lightning.DepthSampling` trains with, free of Lightning: a stage run
at fewer steps of any fixed-grid method, the loss of such a pass attached to the model's
full-depth output, the default loss of a pass, and the roughness in depth of a stage's weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resode_lightning.core.blocks import set_block_step
from resode_lightning.core.coarse import (
    Statistics,
    check_coarse,
    coarse_steps,
    interpolated_call,
    stage_replaced,
)
from resode_lightning.core.metrics import ALL, squared_profiles
from resode_lightning.core.parameters import stage_tensors
from resode_lightning.core.stages import Stage
from resode_lightning.export.grid import GRID_METHODS, grid_step
from resode_lightning.export.solve import NeuralODEStage


class _Branch(nn.Module):
    """Calls the adapter's residual branch on ``block`` (a module ``interpolated_call`` can
    swap the tensors of)."""

    def __init__(self, block: nn.Module, branch: Any) -> None:
        super().__init__()
        self.block = block
        object.__setattr__(self, "branch", branch)

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(self.block, x)


def evaluation_points(depth: int, steps: int, fractions: Sequence[float]) -> list[list[tuple]]:
    """Where each evaluation of ``steps`` equal steps falls among ``depth`` blocks.

    A step of ``n`` evaluates the field at ``(j + c) · horizon / n`` for each fraction ``c`` of
    the method. The weight path is linear between the blocks' times ``t_k = k · horizon / L``
    and constant after the last, as the export's (:mod:`~resode_lightning.core.paths`).

    Returns:
        Per step, per evaluation, ``(k, w)``: block ``k`` interpolated towards block ``k + 1`` by
        ``w`` in ``[0, 1)`` (exact ratios of integers for the fractions of the fixed-grid
        methods).
    """
    points = []
    for j in range(steps):
        row = []
        for c in fractions:
            position = (j + Fraction(c).limit_denominator(10**6)) * Fraction(depth, steps)
            block = min(int(position), depth - 1)
            row.append((block, float(position - block) if block < depth - 1 else 0.0))
        points.append(row)
    return points


class _SolvedStage(nn.Module):
    """In the place of a stage's first block: the stage at ``steps`` steps of ``method`` on its
    weight path, computed by its own blocks (see :func:`stage_at_steps`)."""

    def __init__(self, stage: Stage, method: str, steps: int, statistics: Statistics | None):
        super().__init__()
        self.first = stage.blocks[0]
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "blocks", stage.blocks)  # the stage's places hold others here
        object.__setattr__(self, "statistics", statistics)
        branches = [_Branch(block, stage.adapter.branch) for block in stage.blocks]
        object.__setattr__(self, "branches", branches)
        self.method, self.steps = method, steps
        self.points = evaluation_points(stage.depth, steps, GRID_METHODS[method])

    def _field(self, block: int, weight: float, x: Tensor) -> Tensor:
        following = self.branches[block + 1] if weight else self.branches[block]
        return interpolated_call(self.branches[block], following, weight, self.statistics, x)

    def forward(self, x: Tensor) -> Tensor:
        stage, blocks = self.stage, self.blocks
        norms = [m for b in blocks for m in b.modules() if isinstance(m, _BatchNorm)]
        modes = [norm.training for norm in norms]
        h = (stage.horizon or 1.0) / self.steps
        try:
            for norm in norms:
                norm.train(False)
            for block in blocks:
                set_block_step(block, stage.adapter, 1.0)  # the branch is then F itself
            for row in self.points:
                fields = [
                    lambda y, block=block, weight=weight: self._field(block, weight, y)
                    for block, weight in row
                ]
                x = grid_step(self.method, fields, stage.post, h, x)
        finally:
            for block in blocks:
                set_block_step(block, stage.adapter, stage.step)
            for norm, mode in zip(norms, modes):
                norm.train(mode)
        return x


@contextmanager
def stage_at_steps(
    stage: Stage, method: str, steps: int, statistics: Statistics | None = None
) -> Iterator[None]:
    """Inside the ``with`` block, ``stage`` computes ``steps`` steps of the fixed-grid
    ``method`` on its weight path, differentiably in its blocks' tensors.

    Each evaluation runs the residual branch of the block it falls on, its tensors interpolated
    towards the next block's where it falls between two; a post-step map projects the field at
    the step, as the export does (``docs/theory.md``). Euler is
    :func:`~resode_lightning.core.coarse.coarse_steps`. BatchNorms inside the stage normalise
    with ``statistics`` (full-depth batch statistics) where given, else with their running
    statistics, and update nothing.

    Raises:
        ValueError: ``method`` is not one of :data:`~resode_lightning.export.grid.GRID_METHODS`;
            ``steps`` is not in ``[1, stage.depth]``; the stage cannot run at fewer steps (see
            :func:`~resode_lightning.core.coarse.check_coarse`).
    """
    if method not in GRID_METHODS:
        raise ValueError(f"method must be one of {tuple(GRID_METHODS)}, got {method!r}")
    if len(GRID_METHODS[method]) == 1:
        with coarse_steps(stage, steps, statistics):
            yield
        return
    check_coarse(stage)
    if not 1 <= steps <= stage.depth:
        raise ValueError(f"steps must be between 1 and the stage's depth {stage.depth}")
    with stage_replaced(stage, _SolvedStage(stage, method, steps, statistics)):
        yield


@contextmanager
def running_statistics_kept(norms: Sequence[_BatchNorm]) -> Iterator[None]:
    """Inside the ``with`` block, ``norms`` update no running statistics (they still normalise
    as their mode says)."""
    norms = [norm for norm in norms if norm.track_running_stats]
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    try:
        for norm in norms:
            norm.momentum = 0.0
        yield
    finally:
        for norm, (momentum, count) in zip(norms, kept):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def label_cross_entropy(output: Tensor, full: Tensor, batch: object) -> Tensor:
    """The default loss of a fewer-step pass: the cross-entropy of its logits on the labels
    ``batch[1]`` of a batch ``(inputs, labels, ...)``, as an image classifier's loss.

    Raises:
        ValueError: the output is no tensor of logits, or the batch holds no integer labels of
            its shape (give ``loss=...``, :func:`inplace_distillation` for one).
    """
    labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if not (
        isinstance(output, Tensor)
        and output.dim() >= 2
        and isinstance(labels, Tensor)
        and not labels.is_floating_point()
        and labels.shape == output.shape[:1] + output.shape[2:]
    ):
        found = type(labels).__name__ if not isinstance(labels, Tensor) else tuple(labels.shape)
        raise ValueError(
            f"DepthSampling's default loss is the cross-entropy on the labels batch[1] of a "
            f"batch (inputs, labels); the model returned {type(output).__name__} of shape "
            f"{tuple(getattr(output, 'shape', ()))} and batch[1] is {found}: give "
            f"DepthSampling(loss=...) a function of (output, full_output, batch)"
        )
    return F.cross_entropy(output, labels)


def inplace_distillation(output: Tensor, full: Tensor, batch: object) -> Tensor:
    """A loss of a fewer-step pass that needs no labels: the KL divergence from the full-depth
    pass's softmax (detached) to the pass's, over the last dimension, per sample (the inplace
    distillation of slimmable networks, Yu and Huang 2019).

    Raises:
        ValueError: the outputs are not tensors.
    """
    if not (isinstance(output, Tensor) and isinstance(full, Tensor) and output.dim() >= 1):
        raise ValueError(
            f"inplace_distillation compares tensors of logits; the model returned "
            f"{type(full).__name__}: give DepthSampling(loss=...) a function of (output, "
            f"full_output, batch)"
        )
    target = F.log_softmax(full.detach().flatten(0, -2).float(), dim=-1)
    logits = F.log_softmax(output.flatten(0, -2).float(), dim=-1)
    return F.kl_div(logits, target, log_target=True, reduction="batchmean")


class _WithLoss(torch.autograd.Function):
    """The identity on ``output``, whose backward also backpropagates ``loss`` (gradient 1)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, loss: Tensor) -> Tensor:
        ctx.one = torch.ones_like(loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, ctx.one


def attach_loss(output: Any, loss: Tensor) -> Any:
    """``output`` unchanged, except that whatever backpropagates through it also backpropagates
    ``loss``: the first floating tensor requiring gradients in ``output`` (itself, or an item of
    a tuple, list or dict) carries it.

    Raises:
        ValueError: ``output`` holds no such tensor.
    """
    if isinstance(output, Tensor) and output.is_floating_point() and output.requires_grad:
        return _WithLoss.apply(output, loss)
    items = output.items() if isinstance(output, dict) else enumerate(output)
    if isinstance(output, (tuple, list, dict)):
        for key, item in items:
            if isinstance(item, Tensor) and item.is_floating_point() and item.requires_grad:
                if isinstance(output, dict):
                    return {**output, key: _WithLoss.apply(item, loss)}
                changed = list(output)
                changed[key] = _WithLoss.apply(item, loss)
                return type(output)(changed) if isinstance(output, list) else tuple(changed)
    raise ValueError(
        f"DepthSampling: the model returned {type(output).__name__} with no floating tensor "
        f"requiring gradients, so the losses of the fewer-step passes have nothing to "
        f"backpropagate through"
    )


def roughness(stacked: dict[str, Tensor], horizon: float, order: int) -> Tensor | None:
    """The squared roughness in depth of one stage's weights, relative to their size.

    With ``Δ`` the ``order``-th difference across the ``m`` stacked blocks (or knots) spaced
    ``horizon / m`` apart, ``(m / horizon)^(2·order) · mean_k ||Δθ_k||² / mean_k ||θ_k||²`` on
    all tensors as one vector (the squared profiles of
    :func:`~resode_lightning.core.metrics.squared_profiles`): a discrete ``∫||θ^(order)||²``
    over ``∫||θ||²``, so that its weight does not depend on the scale of the weights, whose
    size (the denominator) is not differentiated. ``None`` when the stage has too few blocks
    for an ``order``-th difference.
    """
    norms2, first2, second2 = squared_profiles(stacked)[ALL]
    differences = first2 if order == 1 else second2
    if differences.numel() == 0:
        return None
    rate = (norms2.numel() / horizon) ** (2 * order)
    return rate * differences.mean() / norms2.mean().detach().clamp_min(1e-30)


def stage_weights(stage: Stage | NeuralODEStage) -> dict[str, Tensor]:
    """The trainable tensors of a stage stacked over depth in the ODE parametrisation (a raw
    stage's blocks, or an export's weight-path knots), differentiably."""
    if isinstance(stage, NeuralODEStage):
        path = stage.field.path
        knots = {name: path.knots(name) for name in path.names}
        return {name: value for name, value in knots.items() if value.requires_grad}
    tensors, lifts = stage_tensors(stage)
    return {
        name: torch.stack(values) * lifts.get(name, 1.0)
        for name, values in tensors.items()
        if values[0].requires_grad
    }


def stage_horizon(stage: Stage | NeuralODEStage) -> float:
    """The stage's time interval (1 for a plain stage), read from the device once: keep it."""
    if isinstance(stage, NeuralODEStage):
        return float(stage.horizon)
    return stage.horizon or 1.0
