"""The table of block adapters: registration, lookup, and registrations undone at a scope's end.

:func:`adapter_for` reads the table by the block's type (its MRO), then asks the inference of
:mod:`~resode_lightning.core.adapters.inferred`. A registered adapter is checked on a probe
(:func:`~resode_lightning.core.verification.verify_block`) the first time its block is met.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from resode_lightning.core.blocks import BlockAdapter, LastLayer, Pairs, Post, qualified_name
from resode_lightning.core.verification import verify_block

_ADAPTERS: dict[type[nn.Module], BlockAdapter] = {}


def register_block(
    block_type: type[nn.Module],
    *,
    branch: Callable[[nn.Module, Tensor], Tensor],
    last_layer: str | Callable[[nn.Module], nn.Module | None] | None = None,
    post: str | Post | None = None,
    is_identity_skip: Callable[[nn.Module], bool] | None = None,
    step_attribute: str | None = None,
    conv_bn_pairs: Pairs | Callable[[nn.Module], Pairs] | None = None,
    example: nn.Module | None = None,
) -> BlockAdapter:
    """Teach the package a residual block type of your own.

    The adapter is checked on a probe the first time a block of this type is met in a model
    (at once when ``example`` is given): a mistake is a
    :class:`~resode_lightning.core.blocks.BlockAdapterError` that names
    the check that failed and its likely cause, never a silently wrong conversion or export.

    Args:
        block_type: the ``nn.Module`` subclass of the block.
        branch: ``branch(block, x)`` returns what the block adds to ``x`` (its residual branch).
        last_layer: the submodule name (e.g. ``"bn2"``) or a function returning the layer that
            ends the branch. It must end it linearly: with an attention gate or a
            weight-standardised conv there, pass ``None``; the gain ``L / horizon`` is then
            applied to the branch output when the field is read.
        post: the map applied after the sum: the name of the block's activation attribute
            (``"act2"``, read per block, ``nn.Identity`` counting as none), a function
            (``torch.relu``), or ``None`` for blocks that return ``x + branch``.
        is_identity_skip: whether a given block keeps its input shape (default: always).
        step_attribute: attribute through which the block applies its own step, if any.
        conv_bn_pairs: conv/norm submodule name pairs that can be fused for export, or a
            function of the block returning them; by default, the pairs the block's torch.fx
            graph shows (a plain conv read only by a BatchNorm), none if it cannot be traced.
            Only plain BatchNorm following a plain conv is folded; other pairs are left as
            they are.
        example: a block to check the adapter on now.

    Returns:
        The registered adapter.

    Raises:
        BlockAdapterError: ``example`` is given and the adapter does not describe it.

    Example::

        >>> import torch
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
        last_layer=LastLayer(_submodule_reader(last_layer)),
        post=_post_reader(post),
        is_identity_skip=is_identity_skip or _always,
        step_attribute=step_attribute,
        conv_bn_pairs=_pairs_reader(conv_bn_pairs),
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


def _pairs_reader(pairs: Pairs | Callable[[nn.Module], Pairs] | None) -> Callable:
    if pairs is None:
        return _graph_pairs
    return pairs if callable(pairs) else _Fixed(tuple(pairs))


def _graph_pairs(block: nn.Module) -> Pairs:
    # imported here: the inferred adapters read this registry's INFERENCE list
    from resode_lightning.core.adapters.inferred import graph_pairs

    return graph_pairs(block)
