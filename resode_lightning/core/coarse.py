"""A stage run at fewer Euler steps than it has blocks, in place and differentiably.

A stage of ``L`` blocks in ODE form is the Euler discretisation, on the grid
``t_k = k * horizon / L``, of the field whose weights ``θ(t)`` follow the linear path through
the blocks (the path :func:`~resode_lightning.export_neural_ode` exports). At ``n <= L`` steps,
step ``j`` starts at ``s_j = j * horizon / n``, which falls in ``[t_k, t_{k+1})`` for exactly one
block ``k``: that block computes ``P(x + (horizon / n) F(θ(s_j), x))``, with ``θ(s_j)``
interpolated between block ``k`` and block ``k + 1``, and the other blocks are skipped. This is
the Euler step the export takes at ``n`` steps, computed by the blocks themselves, so gradients
reach their parameters and nothing is copied when ``n`` divides ``L`` (every step on a block).
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


class _Skip(nn.Module):
    """The place of a block no step starts in: the identity (the block is kept, unused)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x


def _blend(block: nn.Module, following: nn.Module, weight: float, x: Tensor) -> Tensor:
    """``block`` applied to ``x`` with every floating tensor (parameters and buffers)
    interpolated towards ``following``'s by ``weight``, differentiably in both."""
    theirs = dict(following.named_parameters()) | dict(following.named_buffers())
    tensors = {
        name: torch.lerp(tensor, theirs[name], weight)
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]
        if tensor.is_floating_point()
    }
    return functional_call(block, tensors, (x,))


class _Statistics:
    """Forward hook recording the batch mean and (biased) variance a BatchNorm normalises with."""

    def __init__(self) -> None:
        self.values: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        self.values[module] = (x.mean(dims), x.var(dims, unbiased=False))


class _CoarseStage(nn.Module):
    """In the place of a stage's first block: the whole stage at fewer steps (see
    :func:`coarse_steps`); the other blocks' places hold :class:`_Skip`."""

    def __init__(self, stage: Stage, steps: int) -> None:
        super().__init__()
        self.first = stage.blocks[0]
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "blocks", stage.blocks)
        self.steps = steps
        self.offsets = coarse_grid(stage.depth, steps)

    def forward(self, x: Tensor) -> Tensor:
        norms = [m for b in self.blocks for m in b.modules() if isinstance(m, _BatchNorm)]
        modes = [norm.training for norm in norms]
        saved = [(norm.running_mean, norm.running_var) for norm in norms]
        adapter, step = self.stage.adapter, (self.stage.horizon or 1.0) / self.steps
        try:
            if any(modes):
                self._use_full_depth_statistics(x, norms)
            for norm in norms:
                norm.train(False)
            for k, (block, offset) in enumerate(zip(self.blocks, self.offsets)):
                if offset is None:
                    continue
                set_block_step(block, adapter, step)
                x = block(x) if offset == 0 else _blend(block, self.blocks[k + 1], offset, x)
        finally:
            for block in self.blocks:
                set_block_step(block, adapter, self.stage.step)
            for norm, mode, (mean, var) in zip(norms, modes, saved):
                norm.train(mode)
                norm.running_mean, norm.running_var = mean, var
        return x

    @torch.no_grad()
    def _use_full_depth_statistics(self, x: Tensor, norms: list[_BatchNorm]) -> None:
        """Run the stage at full depth on ``x`` (updating the running statistics as a training
        batch does) and make its batch statistics the ones each norm normalises with."""
        recorder = _Statistics()
        handles = [norm.register_forward_hook(recorder) for norm in norms]
        try:
            for block in self.blocks:
                x = block(x)
        finally:
            for handle in handles:
                handle.remove()
        for norm in norms:
            norm.running_mean, norm.running_var = recorder.values[norm]


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
def coarse_steps(stage: Stage, steps: int) -> Iterator[None]:
    """Inside the ``with`` block, ``stage`` computes ``steps`` Euler steps of its weight path.

    BatchNorm: the stage's norms normalise with full-depth statistics at every step count, the
    ones the exported field folds in. In eval mode these are the running statistics. In
    training mode each batch first runs the stage at full depth without gradient, which
    updates the running statistics as a full-depth batch does, and the fewer steps normalise
    with that pass's batch statistics (block by block, interpolated with the weights).

    Raises:
        ValueError: ``stage`` is not in ODE form or its step cannot be changed; ``steps`` is not
            between 1 and the stage's depth.
    """
    check_coarse(stage)
    coarse_grid(stage.depth, steps)
    if steps == stage.depth:
        yield
        return
    container, blocks = stage.container, stage.blocks
    names = [list(container._modules)[i] for i in stage.indices]
    try:
        container._modules[names[0]] = _CoarseStage(stage, steps)
        for name, block in zip(names[1:], blocks[1:]):
            container._modules[name] = _Skip(block)
        yield
    finally:
        for name, block in zip(names, blocks):
            container._modules[name] = block
