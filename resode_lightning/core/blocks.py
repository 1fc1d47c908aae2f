"""Block adapters: how the package reads one residual block type, and the table of them.

An adapter tells, for one block type, how to call its residual branch ``F``, which layer ends
the branch (the one the ODE-form rescale multiplies), the post-step map ``P`` and which
conv/norm pairs fold for export, so that ``block(x) == P(x + F(x))``. Everything that reads an
adapter is only right if the adapter is: :func:`verify_block` checks one on a probe.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resode_lightning.core.step import ODEStep, named_modules_by_key, step_wrappers

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
            factor ``L / horizon`` itself when the field is read.
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


_ADAPTERS: dict[type[nn.Module], BlockAdapter] = {}
_VERIFIED: set[tuple[BlockAdapter, tuple]] = set()


def register_block(
    block_type: type[nn.Module],
    *,
    branch: Callable[[nn.Module, Tensor], Tensor],
    last_layer: str | Callable[[nn.Module], nn.Module | None] | None = None,
    post: str | Post | None = None,
    is_identity_skip: Callable[[nn.Module], bool] | None = None,
    step_attribute: str | None = None,
    conv_bn_pairs: Pairs | Callable[[nn.Module], Pairs] = (),
    example: nn.Module | None = None,
) -> BlockAdapter:
    """Teach the package a residual block type of your own.

    The adapter is checked on a probe the first time a block of this type is met in a model
    (at once when ``example`` is given): a mistake is a :class:`BlockAdapterError` that names
    the check that failed and its likely cause, never a silently wrong conversion or export.

    Args:
        block_type: the ``nn.Module`` subclass of the block.
        branch: ``branch(block, x)`` returns what the block adds to ``x`` (its residual branch).
        last_layer: the submodule name (e.g. ``"bn2"``) or a function returning the layer that
            ends the branch. It must end it linearly: with an attention gate or a
            weight-standardised conv there, pass ``None``; the factor ``L / horizon`` is then
            applied to the branch output when the field is read.
        post: the map applied after the sum: the name of the block's activation attribute
            (``"act2"``, read per block, ``nn.Identity`` counting as none), a function
            (``torch.relu``), or ``None`` for blocks that return ``x + branch``.
        is_identity_skip: whether a given block keeps its input shape (default: always).
        step_attribute: attribute through which the block applies its own step, if any.
        conv_bn_pairs: conv/norm submodule name pairs that can be fused for export, or a
            function of the block returning them. Only plain BatchNorm following a plain conv
            is folded; other pairs are left as they are.
        example: a block to check the adapter on now.

    Returns:
        The registered adapter.

    Raises:
        BlockAdapterError: ``example`` is given and the adapter does not describe it.

    Example::

        >>> class MyBlock(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(8, 8, 3, padding=1)
        ...     def forward(self, x):
        ...         return x + self.conv(torch.tanh(x))
        >>> def branch(block, x):
        ...     return block.conv(torch.tanh(x))
        >>> with registration_scope():
        ...     _ = register_block(MyBlock, branch=branch, last_layer="conv", example=MyBlock())
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f"block_type must be an nn.Module subclass, got {block_type!r}")
    if not callable(branch):
        raise TypeError("branch must be a callable branch(block, x) -> Tensor")
    adapter = BlockAdapter(
        branch=branch,
        last_layer=_LastLayer(_submodule_reader(last_layer)),
        post=_post_reader(post),
        is_identity_skip=is_identity_skip or _always,
        step_attribute=step_attribute,
        conv_bn_pairs=conv_bn_pairs if callable(conv_bn_pairs) else _Fixed(tuple(conv_bn_pairs)),
    )
    if block_type in _ADAPTERS:
        warnings.warn(
            f"register_block: replacing the adapter of {qualified_name(block_type)}; use "
            f"resode_lightning.registration_scope() to register for a limited scope",
            UserWarning,
            stacklevel=2,
        )
    if example is not None:
        if not isinstance(example, block_type):
            raise TypeError(f"example must be a {block_type.__name__}, got {type(example)!r}")
        verify_block(example, adapter)
    _ADAPTERS[block_type] = adapter
    return adapter


def adapter_for(block: nn.Module) -> BlockAdapter | None:
    """The adapter registered for ``block``'s type (or its nearest registered base class), else
    one read from the block's code and verified (:mod:`resode_lightning.core.adapters.inferred`)."""
    for cls in type(block).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    for infer in INFERENCE:
        adapter = infer(block)
        if adapter is not None:
            return adapter
    return None


INFERENCE: list[Callable[[nn.Module], BlockAdapter | None]] = []
"""Where :func:`adapter_for` looks after the registered types, in order (the inferred adapters
add themselves when :mod:`resode_lightning.core.adapters` is imported)."""


def registered_blocks() -> dict[type[nn.Module], BlockAdapter]:
    """A copy of the table of registered block types and their adapters."""
    return dict(_ADAPTERS)


@contextmanager
def registration_scope() -> Iterator[None]:
    """Registrations made inside the ``with`` block are undone when it ends.

    Example::

        >>> with registration_scope():
        ...     _ = register_block(nn.Identity, branch=lambda block, x: x * 0)
        >>> nn.Identity in registered_blocks()
        False
    """
    saved = dict(_ADAPTERS)
    try:
        yield
    finally:
        # the built-in adapters registered lazily in the scope (timm's) stay registered
        builtin = {
            cls: adapter
            for cls, adapter in _ADAPTERS.items()
            if cls not in saved and _is_builtin(adapter)
        }
        _ADAPTERS.clear()
        _ADAPTERS.update(saved | builtin)


def _is_builtin(adapter: BlockAdapter) -> bool:
    module = getattr(adapter.branch, "__module__", None) or ""
    return module.startswith("resode_lightning.core.adapters.")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Fixed:
    """A constant function of the block (picklable)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __call__(self, block: nn.Module) -> object:
        return self.value


class _Submodule:
    """Reads a named submodule of the block (picklable)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, block: nn.Module) -> nn.Module | None:
        return block.get_submodule(self.name)


class _LastLayer:
    """Reads the layer ending the branch: in an ODE-form block, the layer its
    :class:`~resode_lightning.core.step.ODEStep` holds, else what ``read`` returns
    (picklable). Adapters' own readers thus only ever see plain blocks' layers."""

    def __init__(self, read: Callable[[nn.Module], nn.Module | None]) -> None:
        self.read = read

    def __call__(self, block: nn.Module) -> nn.Module | None:
        wrapped = next(step_wrappers(block), None)
        return wrapped[1].layer if wrapped is not None else self.read(block)


class _Activation(_Submodule):
    """Reads the block's activation submodule; ``nn.Identity`` counts as no post map."""

    def __call__(self, block: nn.Module) -> Post | None:
        module = super().__call__(block)
        return None if module is None or isinstance(module, nn.Identity) else module


def _submodule_reader(layer: str | Callable | None) -> Callable[[nn.Module], nn.Module | None]:
    if isinstance(layer, str):
        return _Submodule(layer)
    return layer if layer is not None else _Fixed(None)


def _post_reader(post: str | Post | None) -> Callable[[nn.Module], Post | None]:
    if isinstance(post, str):
        return _Activation(post)
    if post is not None and not callable(post):
        raise TypeError(f"post must be an attribute name, a function or None, got {post!r}")
    return _Fixed(post)


def _always(block: nn.Module) -> bool:
    return True


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


# ----------------------------------------------------------------------------- verification

_TOLERANCE = 1e-6
_FACTOR = 3.0


def verify_block(block: nn.Module, adapter: BlockAdapter) -> None:
    """Check ``adapter`` on a float64 copy of ``block`` with random weights, once per layout.

    Checks that ``block(x) == post(x + branch(block, x))``; that the branch scales with the
    last layer's weight and bias (or with the step attribute), so that the ODE-form rescale and
    the exported field compute the block; and that folding ``conv_bn_pairs`` keeps the branch.
    Together these make one Euler step of the exported field equal to the block.

    Raises:
        BlockAdapterError: a check fails; the message names the block type, the check, the
            relative error and the likely cause.
    """
    key = (adapter, _layout(block))
    if key in _VERIFIED:
        return
    if any(t.is_meta for t in block.parameters()):
        return  # nothing to compute on; checked when the block holds real weights
    probe = _probe_copy(block)
    x = _runnable_input(probe)
    if x is None:
        warnings.warn(
            f"{qualified_name(type(block))}: its adapter is not verified, because the block "
            f"could not run on an input of the width of any of its conv, norm or linear layers",
            UserWarning,
            stacklevel=3,
        )
        return
    try:
        with torch.no_grad():
            set_block_step(probe, adapter, None)
            _check_sum(probe, adapter, x)
            _check_scaling(probe, adapter, x)
            _check_folding(probe, adapter, x)
    except BlockAdapterError:
        raise
    except Exception as error:  # user code in the adapter: report it with the block type
        raise _fail(
            block, "the adapter raised on the block", math.inf, f"{type(error).__name__}: {error}"
        ) from error
    _VERIFIED.add(key)


def _runnable_input(block: nn.Module) -> Tensor | None:
    for x in _probe_inputs(block):
        try:
            with torch.no_grad():
                block(x.clone())
        except Exception:  # the block's own code rejects this width: try the next one
            continue
        return x
    return None


def _layout(block: nn.Module) -> tuple:
    """The block's submodule types by name, the same in plain and ODE form."""
    return tuple((name, type(module)) for name, module in named_modules_by_key(block))


def _probe_copy(block: nn.Module) -> nn.Module:
    probe = copy.deepcopy(block).to("cpu", torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*probe.named_parameters(), *probe.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif leaf == "running_mean" or (isinstance(tensor, nn.Parameter) and leaf == "bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif isinstance(tensor, nn.Parameter) and tensor.dim() == 1:
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif isinstance(tensor, nn.Parameter):
                fan_in = max(1, tensor[0].numel())
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))
    return probe


def _probe_inputs(block: nn.Module) -> list[Tensor]:
    """Candidate inputs of the block's width, from its conv, norm and linear layers in order."""
    generator = torch.Generator().manual_seed(1)
    sizes: list[tuple[int, ...]] = []
    for module in block.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            size = (2, module.in_channels, *[8] * len(module.kernel_size))
        elif isinstance(module, _BatchNorm):
            dims = {nn.BatchNorm1d: 1, nn.BatchNorm3d: 3}
            extra = next((d for cls, d in dims.items() if isinstance(module, cls)), 2)
            size = (2, module.num_features, *[8] * extra)
        elif isinstance(module, nn.Linear):
            size = (2, module.in_features)
        else:
            continue
        if size not in sizes:
            sizes.append(size)
    return [torch.randn(size, generator=generator, dtype=torch.float64) for size in sizes]


def _relative(actual: Tensor, expected: Tensor) -> float:
    scale = expected.norm().item() or 1.0
    return (actual - expected).norm().item() / scale


def _fail(block: nn.Module, check: str, error: float, cause: str) -> BlockAdapterError:
    return BlockAdapterError(
        f"the adapter of {qualified_name(type(block))} does not describe the block: {check} "
        f"(relative error {error:.2g} on a float64 probe). Likely cause: {cause}"
    )


def _check_sum(block: nn.Module, adapter: BlockAdapter, x: Tensor) -> None:
    out = block(x.clone())
    increment = adapter.branch(block, x.clone())
    post = adapter.post(block)
    summed = x + increment
    error = _relative(post(summed.clone()) if post is not None else summed, out)
    if error <= _TOLERANCE:
        return
    if post is None and _relative(torch.relu(summed), out) <= _TOLERANCE:
        cause = (
            "the block applies an activation after the sum: pass post='<its activation "
            "attribute>' (or post=torch.relu) to register_block"
        )
    elif post is not None and _relative(summed, out) <= _TOLERANCE:
        cause = "the block returns x + branch with no activation after the sum: pass post=None"
    else:
        cause = "branch(block, x) is not what the block adds to x; compare it with forward()"
    raise _fail(block, "block(x) != post(x + branch(block, x))", error, cause)


def _check_scaling(block: nn.Module, adapter: BlockAdapter, x: Tensor) -> None:
    if adapter.step_attribute is not None:
        scaled = copy.deepcopy(block)
        setattr(scaled, adapter.step_attribute, 1.0)
        unit = adapter.branch(scaled, x.clone())
        setattr(scaled, adapter.step_attribute, _FACTOR)
        error = _relative(adapter.branch(scaled, x.clone()), _FACTOR * unit)
        if error > _TOLERANCE:
            raise _fail(
                block,
                f"setting {adapter.step_attribute!r} to c does not multiply the branch by c",
                error,
                f"the block does not compute x + {adapter.step_attribute} * F(x); pass "
                f"step_attribute=None",
            )
    last = adapter.last_layer(block)
    if last is None:
        return
    if not any(module is last for module in block.modules()):
        raise _fail(block, "last_layer(block) is not a submodule of the block", math.inf, "")
    scaled = copy.deepcopy(block)
    layer = adapter.last_layer(scaled)
    for name in ("weight", "bias"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, Tensor):
            tensor.mul_(_FACTOR)
    expected = _FACTOR * adapter.branch(block, x.clone())
    error = _relative(adapter.branch(scaled, x.clone()), expected)
    if error <= _TOLERANCE:
        return
    if isinstance(last, nn.modules.conv._ConvNd) and not is_plain_conv(last):
        cause = (
            f"last_layer is a {type(last).__name__}, whose output does not scale with its weight "
            f"(weight standardisation?): use last_layer=None"
        )
    else:
        cause = (
            "a non-linear map follows last_layer (an attention gate?): use last_layer=None, "
            "or the last layer after the gate"
        )
    raise _fail(
        block, "scaling last_layer's weight and bias by c does not scale the branch", error, cause
    )


def _check_folding(block: nn.Module, adapter: BlockAdapter, x: Tensor) -> None:
    pairs = adapter.conv_bn_pairs(block)
    if not pairs:
        return
    folded = copy.deepcopy(block)
    try:
        fold_batchnorm(folded, pairs)
    except AttributeError as error:
        raise _fail(
            block, f"conv_bn_pairs {pairs} name no submodules", math.inf, str(error)
        ) from None
    error = _relative(adapter.branch(folded, x.clone()), adapter.branch(block, x.clone()))
    if error > _TOLERANCE:
        raise _fail(
            block,
            f"folding conv_bn_pairs {pairs} changes the branch",
            error,
            "a pair's norm does not directly follow its conv",
        )
