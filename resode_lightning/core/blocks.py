"""Block adapters: how the package reads one residual block type, and what it does to a block
through one (set its step, fold its BatchNorm).

An adapter tells, for one block type, how to call its residual branch ``F``, which layer ends
the branch (the one the ODE-form rescale multiplies), the post-step map ``P`` and which
conv/norm pairs fold for export, so that ``block(x) == P(x + F(x))``. Everything that reads an
adapter is only right if the adapter is: :func:`~resode_lightning.core.verification.verify_block`
checks one on a probe; :mod:`~resode_lightning.core.registry` holds the table of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resode_lightning.core.step import ODEStep, step_wrappers

Post = Callable[[Tensor], Tensor]
Pairs = tuple[tuple[str, str], ...]


class BlockAdapterError(ValueError):
    """A registered adapter does not describe its block (the package would compute another net)."""


@dataclass(frozen=True)
class BlockAdapter:
    """How the package reads one residual block type. Every field is a function of the block.

    Attributes:
        branch: ``branch(block, x)``: what the block adds to ``x`` before ``post``, so that
            ``block(x) == post(block)(x + branch(block, x))``.
        last_layer: ``last_layer(block)``: the affine layer that ends the branch linearly (the
            branch scales with its weight and bias), or ``None``; the stage then applies the
            gain ``L / horizon`` itself when the field is read.
        post: ``post(block)``: the map applied after the sum, ``None`` for the identity.
        is_identity_skip: whether a block's skip connection is the identity (it keeps shape).
        step_attribute: name of the block attribute holding its own step ``h``, for blocks that
            compute ``x + h * F(x)`` natively; ``None`` when the package puts the last layer in
            an :class:`~resode_lightning.core.step.ODEStep` instead.
        conv_bn_pairs: ``conv_bn_pairs(block)``: ``(conv, norm)`` submodule names that fold.
    """

    branch: Callable[[nn.Module, Tensor], Tensor]
    last_layer: Callable[[nn.Module], nn.Module | None]
    post: Callable[[nn.Module], Post | None]
    is_identity_skip: Callable[[nn.Module], bool]
    step_attribute: str | None
    conv_bn_pairs: Callable[[nn.Module], Pairs]


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class LastLayer:
    """Reads the layer ending the branch: in an ODE-form block, the layer its
    :class:`~resode_lightning.core.step.ODEStep` holds, else what ``read`` returns
    (picklable). Adapters' own readers thus only ever see plain blocks' layers."""

    def __init__(self, read: Callable[[nn.Module], nn.Module | None]) -> None:
        self.read = read

    def __call__(self, block: nn.Module) -> nn.Module | None:
        wrapped = next(step_wrappers(block), None)
        return wrapped[1].layer if wrapped is not None else self.read(block)


# ----------------------------------------------------------------------------- step


def set_block_step(block: nn.Module, adapter: BlockAdapter, step: float | None) -> None:
    """Make ``block`` multiply its branch by ``step`` (``None``: the plain block, no factor).

    A block with a step attribute gets it set. Otherwise the layer ending the branch is put in
    an :class:`~resode_lightning.core.step.ODEStep` (its step updated when it is in one
    already); ``None`` puts the bare layer back. Blocks with no such layer are left alone.
    """
    if adapter.step_attribute is not None:
        setattr(block, adapter.step_attribute, 1.0 if step is None else step)
        return
    wrapped = next(step_wrappers(block), None)
    if wrapped is not None:
        name, wrapper = wrapped
        if step is None:
            block.set_submodule(name, wrapper.layer)
        else:
            wrapper.step = float(step)
        return
    last = None if step is None else adapter.last_layer(block)
    if last is None:
        return
    name = next((name for name, module in block.named_modules() if module is last), None)
    if not name:
        raise BlockAdapterError(
            f"the last layer of {qualified_name(type(block))} is not a submodule of the block: "
            f"last_layer must return one of its layers"
        )
    block.set_submodule(name, ODEStep(last, step))


# ----------------------------------------------------------------------------- fusion


def _remainder_after_fold(norm: nn.Module) -> nn.Module | None:
    """What is left of ``norm`` once its BatchNorm is folded into the conv before it: the
    identity for a plain BatchNorm, the activation of timm's norm+act layers; ``None`` when
    ``norm`` is no eval-foldable BatchNorm."""
    if not isinstance(norm, _BatchNorm) or not norm.track_running_stats:
        return None
    if type(norm).forward is _BatchNorm.forward:
        return nn.Identity()
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)  # timm's BatchNormAct2d
    if isinstance(act, nn.Module) and isinstance(drop, nn.Identity):
        return act
    return None


def is_plain_conv(conv: nn.Module) -> bool:
    """A convolution computing ``conv(x, weight, bias)`` (no weight standardisation or padding)."""
    return type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(block: nn.Module, pairs: Pairs) -> None:
    """Fuse each eval-mode ``(conv, norm)`` pair of ``block`` into one conv, in place.

    A timm norm+act layer leaves its activation in place of the norm. A norm in an
    :class:`~resode_lightning.core.step.ODEStep` (an ODE-form block) hands the step to the
    fused conv, which then ends the branch. Pairs whose conv or norm computes more than that
    are left as they are.
    """
    for conv_name, norm_name in foldable_pairs(block, pairs):
        conv, norm = block.get_submodule(conv_name), block.get_submodule(norm_name)
        step = norm.step if isinstance(norm, ODEStep) else None
        norm = norm.layer if isinstance(norm, ODEStep) else norm
        fused = fuse_conv_bn_eval(conv.eval(), norm.eval())
        block.set_submodule(conv_name, fused if step is None else ODEStep(fused, step))
        block.set_submodule(norm_name, _remainder_after_fold(norm))


def foldable_pairs(block: nn.Module, pairs: Pairs) -> Pairs:
    """The pairs of ``pairs`` that :func:`fold_batchnorm` folds in ``block``: a plain conv and
    an eval-foldable BatchNorm (not one whose activation would have to move before a step)."""
    kept = []
    for conv_name, norm_name in pairs:
        conv, norm = block.get_submodule(conv_name), block.get_submodule(norm_name)
        wrapped = isinstance(norm, ODEStep)
        remainder = _remainder_after_fold(norm.layer if wrapped else norm)
        if not is_plain_conv(conv) or remainder is None:
            continue
        if wrapped and not isinstance(remainder, nn.Identity):
            continue  # the step would move before the norm's activation
        kept.append((conv_name, norm_name))
    return tuple(kept)
