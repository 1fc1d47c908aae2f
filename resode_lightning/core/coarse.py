"""A stage run at fewer Euler steps than it has blocks, in place and differentiably.

A stage of ``L`` blocks in ODE form is the Euler discretisation, on the grid
``t_k = k * horizon / L``, of the field whose weights ``θ(t)`` follow the linear path through
the blocks (the path :func:`~resode_lightning.export_neural_ode` exports). At ``n <= L`` steps,
step ``j`` starts at ``s_j = j * horizon / n``, which falls in ``[t_k, t_{k+1})`` for exactly one
block ``k``: that block computes ``P(x + (horizon / n) F(θ(s_j), x))``, with ``θ(s_j)``
interpolated between block ``k`` and block ``k + 1``, and the other blocks are skipped. This is
the Euler step the export takes at ``n`` steps, computed by the blocks themselves, so gradients
reach their parameters; weights are interpolated only where a step starts between blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from resode_lightning.core.blocks import set_block_step
from resode_lightning.core.stages import Stage


def coarse_grid(depth: int, steps: int) -> list[float | None]:
    """Where each of ``steps`` equal steps starts among ``depth`` blocks.

    Returns:
        For every block ``k``: ``None`` when no step starts in ``[t_k, t_{k+1})``, else the
        start's offset in ``[0, 1)`` from ``t_k`` in units of ``t_{k+1} - t_k`` (exact: the
        offsets are ratios of integers).

    Raises:
        ValueError: unless ``1 <= steps <= depth``.
    """
    if not 1 <= steps <= depth:
        raise ValueError(f"steps must be between 1 and the stage's depth {depth}, got {steps}")
    offsets: list[float | None] = [None] * depth
    for j in range(steps):
        block, remainder = divmod(j * depth, steps)
        offsets[block] = remainder / steps
    return offsets


Statistics = dict[nn.Module, tuple[Tensor, Tensor]]
"""``{norm: (mean, variance)}``: the batch statistics a BatchNorm normalised a batch with."""


class BatchStatistics:
    """Inside the ``with`` block, records per BatchNorm the batch statistics it normalises with.

    A forward hook on each norm in training mode keeps the mean and the (biased) variance of its
    input as tensors in the autograd graph, so that a pass normalising with them is
    differentiable in them, as a BatchNorm is in its batch statistics. The hooks are removed
    when the block ends; :attr:`values` stays.

    Args:
        norms: the BatchNorm layers to watch (affine, with running statistics).

    Raises:
        ValueError: a norm without affine parameters or running statistics.
    """

    def __init__(self, norms: list[_BatchNorm]) -> None:
        odd = [n for n in norms if n.weight is None or n.running_mean is None]
        if odd:
            raise ValueError(
                f"{type(odd[0]).__name__} without affine parameters or running statistics in a "
                f"stage: fewer steps cannot normalise with full-depth statistics"
            )
        self.norms = norms
        self.values: Statistics = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BatchStatistics:
        self.values = {}
        self._handles = [norm.register_forward_hook(self._record) for norm in self.norms]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, norm: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if norm.training:
            x = args[0]
            dims = [d for d in range(x.dim()) if d != 1]
            self.values[norm] = (x.mean(dims), x.var(dims, unbiased=False))


class _Skip(nn.Module):
    """The place of a block no step starts in: the identity (the block is kept, unused)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x


def interpolated_call(
    block: nn.Module,
    following: nn.Module,
    weight: float,
    statistics: Statistics | None,
    x: Tensor,
) -> Tensor:
    """``block`` applied to ``x`` with every floating tensor interpolated towards
    ``following``'s by ``weight`` (differentiably in both), its BatchNorms normalising with
    their ``statistics`` (interpolated alike) where recorded, else with their running ones.

    ``block`` and ``following`` are modules of one structure (two blocks of a stage, or the
    same wrapper around each, such as one calling the block's residual branch)."""
    if weight == 0 and not statistics:
        return block(x)
    theirs = dict(following.named_parameters()) | dict(following.named_buffers())
    tensors = {
        name: torch.lerp(tensor, theirs[name], weight) if weight else tensor
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]
        if tensor.is_floating_point()
    }
    if statistics is not None:
        others = dict(following.named_modules())
        for name, norm in block.named_modules():
            if norm in statistics:
                prefix = f"{name}." if name else ""
                (mean, var), (mean1, var1) = statistics[norm], statistics[others[name]]
                if weight:
                    mean, var = torch.lerp(mean, mean1, weight), torch.lerp(var, var1, weight)
                # the norm in eval mode with zero mean and unit variance is its affine map
                scale = tensors[f"{prefix}weight"] * torch.rsqrt(var + norm.eps)
                tensors[f"{prefix}bias"] = tensors[f"{prefix}bias"] - mean * scale
                tensors[f"{prefix}weight"] = scale
                tensors[f"{prefix}running_mean"] = torch.zeros_like(mean)
                tensors[f"{prefix}running_var"] = torch.full_like(var, 1.0 - norm.eps)
    return functional_call(block, tensors, (x,))


class _CoarseStage(nn.Module):
    """In the place of a stage's first block: the whole stage at fewer steps (see
    :func:`coarse_steps`); the other blocks' places hold :class:`_Skip`."""

    def __init__(self, stage: Stage, steps: int, statistics: Statistics | None) -> None:
        super().__init__()
        self.first = stage.blocks[0]
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "blocks", stage.blocks)
        object.__setattr__(self, "statistics", statistics)
        self.steps = steps
        self.offsets = coarse_grid(stage.depth, steps)

    def forward(self, x: Tensor) -> Tensor:
        norms = [m for b in self.blocks for m in b.modules() if isinstance(m, _BatchNorm)]
        modes = [norm.training for norm in norms]
        adapter, step = self.stage.adapter, (self.stage.horizon or 1.0) / self.steps
        try:
            for norm in norms:
                norm.train(False)
            for k, (block, offset) in enumerate(zip(self.blocks, self.offsets)):
                if offset is not None:
                    set_block_step(block, adapter, step)
                    following = self.blocks[k + 1] if offset else block
                    x = interpolated_call(block, following, offset, self.statistics, x)
        finally:
            for block in self.blocks:
                set_block_step(block, adapter, self.stage.step)
            for norm, mode in zip(norms, modes):
                norm.train(mode)
        return x


def check_coarse(stage: Stage) -> None:
    """Raise ``ValueError`` unless :func:`coarse_steps` can run ``stage``."""
    if not stage.is_ode_form:
        raise ValueError(
            f"stage {stage.name!r} is not in ODE form: put it in ODE form first (the ODEForm "
            f"callback, to_ode_form, or an ode_resnet)"
        )
    adapter = stage.adapter
    if adapter.step_attribute is None and adapter.last_layer(stage.blocks[0]) is None:
        raise ValueError(
            f"stage {stage.name!r}: a {type(stage.blocks[0]).__name__} has no layer ending its "
            f"branch, so its step cannot be changed; register the block with last_layer=... or "
            f"step_attribute=..."
        )


@contextmanager
def coarse_steps(stage: Stage, steps: int, statistics: Statistics | None = None) -> Iterator[None]:
    """Inside the ``with`` block, ``stage`` computes ``steps`` Euler steps of its weight path.

    The stage's BatchNorms neither use nor update batch statistics of their own at fewer
    steps: they normalise with ``statistics`` (per norm, from a full-depth pass of the same
    batch recorded by :class:`BatchStatistics`; differentiably) when given, else with their
    running statistics, as the exported field does.

    Raises:
        ValueError: ``stage`` is not in ODE form or its step cannot be changed; ``steps`` is not
            between 1 and the stage's depth.
    """
    check_coarse(stage)
    coarse_grid(stage.depth, steps)
    if steps == stage.depth:
        yield
        return
    with stage_replaced(stage, _CoarseStage(stage, steps, statistics)):
        yield


@contextmanager
def stage_replaced(stage: Stage, module: nn.Module) -> Iterator[None]:
    """Inside the ``with`` block, ``module`` runs in place of ``stage``'s blocks: it takes the
    first block's place in the container and the other blocks' places are the identity (the
    blocks stay in the model, unused, so their parameters keep their names)."""
    container, blocks = stage.container, stage.blocks
    names = [list(container._modules)[i] for i in stage.indices]
    try:
        container._modules[names[0]] = module
        for name, block in zip(names[1:], blocks[1:]):
            container._modules[name] = _Skip(block)
        yield
    finally:
        for name, block in zip(names, blocks):
            container._modules[name] = block
