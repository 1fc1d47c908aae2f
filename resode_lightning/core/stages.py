"""Residual stages: runs of shape-preserving residual blocks, found through block adapters.

A stage of L blocks computes ``x_{k+1} = P(x_k + h * F_k(x_k))``. A
:class:`~resode_lightning.core.blocks.BlockAdapter` tells, for one block type, how to call its
residual branch, which layer ends the branch (the one the ODE-form rescale multiplies) and the
post-step map ``P``. Blocks are found in any container (``nn.Sequential``, ``nn.ModuleList``,
timm's ``RegStage``, modules with named children), never inside a registered block.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from resode_lightning.core.adapters import register_timm_if_imported
from resode_lightning.core.adapters.inferred import (
    REASONS,
    ChildrenAsLeaves,
    block_graph,
    loop_skip_owner,
)
from resode_lightning.core.blocks import BlockAdapter, Post, qualified_name
from resode_lightning.core.registry import _ADAPTERS, adapter_for
from resode_lightning.core.step import state_dict_name
from resode_lightning.core.verification import verify_block

MARKER = "ode_horizon"
"""Name (or prefix) of the persistent buffer that marks a stage as converted to ODE form."""


@dataclass
class Stage:
    """An ordered run of at least two residual blocks of one type with identical state shape.

    Attributes:
        name: stable name: the container's module path (``layer3``), with ``[i:j]`` appended
            when the container holds more than one stage.
        container: the module whose children the blocks are.
        indices: positions of the blocks in ``container``.
        adapter: how to read the blocks.
        marker: name of the buffer on ``container`` that marks this stage as ODE form.
    """

    name: str
    container: nn.Module
    indices: list[int]
    adapter: BlockAdapter
    marker: str

    @property
    def blocks(self) -> list[nn.Module]:
        children = list(self.container.children())
        return [children[i] for i in self.indices]

    @property
    def post(self) -> Post | None:
        """The post-step map ``P`` of the stage's blocks (``None``: the identity)."""
        return self.adapter.post(self.blocks[0])

    @property
    def depth(self) -> int:
        return len(self.indices)

    @property
    def horizon(self) -> float | None:
        """The ODE horizon when the stage is in ODE form, else ``None``."""
        marker = self.container._buffers.get(self.marker)
        return None if marker is None else float(marker)

    @property
    def is_ode_form(self) -> bool:
        return self.marker in self.container._buffers

    @property
    def step(self) -> float:
        """The step ``h`` of the Euler scheme (``1 / L`` when the stage is not in ODE form)."""
        return (self.horizon or 1.0) / self.depth

    def __repr__(self) -> str:
        form = f"ODE form, horizon={self.horizon:g}" if self.is_ode_form else "plain"
        kind = type(self.blocks[0]).__name__
        return f"Stage({self.name!r}, {self.depth} x {kind}, {form})"


def find_stages(model: nn.Module) -> list[Stage]:
    """Every maximal run of two or more consecutive identity-skip residual blocks, in order.

    Blocks are children of any container (registered blocks are not looked inside). A block
    whose skip changes shape (a downsampling block), a block of another type, another post map
    or other parameter shapes (a pruned net) ends a run. The adapter of each block layout met
    is verified once on a probe (:func:`~resode_lightning.core.verification.verify_block`).

    Raises:
        ValueError: when the model holds no residual stage; the message lists the block types
            seen and says how to register one.
        BlockAdapterError: a registered adapter does not describe its block.
    """
    register_timm_if_imported()
    stages: list[Stage] = []
    for path, module in _containers(model, ""):
        children = list(module.children())
        runs = [
            run for run in _identity_runs(children) if _chained(model, path, children[slice(*run)])
        ]
        for start, stop in runs:
            name = path or type(model).__name__
            marker = MARKER
            if len(runs) > 1:
                name = f"{name}[{start}:{stop}]"
                marker = f"{MARKER}_{start}"
            adapter = adapter_for(children[start])
            verify_block(children[start], adapter)
            stages.append(Stage(name, module, list(range(start, stop)), adapter, marker))
    if not stages:
        raise ValueError(_no_stage_message(model))
    return stages


def _containers(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """``module`` and its descendants, without looking inside registered blocks."""
    yield path, module
    for name, child in module.named_children():
        if adapter_for(child) is None:
            yield from _containers(child, f"{path}.{name}" if path else name)


def _chained(model: nn.Module, path: str, blocks: list[nn.Module]) -> bool:
    """Whether the code around ``blocks`` applies them one after the other, each to the last
    one's output and to nothing else (as ``nn.Sequential`` does): read from the graph of the
    nearest module with a ``forward`` of its own, the blocks kept whole. A tree that feeds both
    children's outputs to a root (DLA) is no stage."""
    names = path.split(".") if path else []
    for depth in range(len(names), -1, -1):
        owner = model.get_submodule(".".join(names[:depth]))
        forward = type(owner).forward
        if forward is nn.Sequential.forward:
            return depth == len(names)
        if forward is not nn.Module.forward:
            return chained_in_graph(owner, blocks)
    return False


def chained_in_graph(owner: nn.Module, blocks: list[nn.Module]) -> bool:
    """Whether ``owner``'s traced graph calls ``blocks`` once each, in order, as a chain
    (cached per owner and run; ``False`` when ``owner`` cannot be traced)."""
    key = tuple(id(block) for block in blocks)
    cache = _CHAINS.setdefault(owner, {})
    if key not in cache:
        cache[key] = _trace_chain(owner, blocks)
    return cache[key]


_CHAINS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], bool]] = (
    weakref.WeakKeyDictionary()
)


def _trace_chain(owner: nn.Module, blocks: list[nn.Module]) -> bool:
    try:
        graph = ChildrenAsLeaves().trace(owner)
    except Exception:  # code torch.fx cannot follow: the chain cannot be shown
        return False
    paths = {id(module): name for name, module in owner.named_modules(remove_duplicate=False)}
    calls = []
    for block in blocks:
        found = [
            n for n in graph.nodes if n.op == "call_module" and n.target == paths.get(id(block))
        ]
        if len(found) != 1:
            return False
        calls.append(found[0])
    return all(
        list(after.all_input_nodes) == [before] and list(before.users) == [after]
        for before, after in zip(calls, calls[1:])
    )


def _run_key(block: nn.Module) -> tuple | None:
    """What blocks of one stage share: type, post map and parameter shapes (``None``: no block)."""
    adapter = adapter_for(block)
    if adapter is None or not adapter.is_identity_skip(block):
        return None
    post = adapter.post(block)
    post_key = None if post is None else (type(post), repr(post))
    shapes = tuple((name, tuple(p.shape)) for name, p in block.named_parameters())
    return type(block), post_key, shapes


def _identity_runs(children: list[nn.Module]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    keys = [_run_key(child) for child in children] + [None]
    start = 0
    for i in range(1, len(keys)):
        if keys[i] != keys[start] or keys[i] is None:
            if keys[start] is not None and i - start >= 2:
                runs.append((start, i))
            start = i
    return runs


def _no_stage_message(model: nn.Module) -> str:
    types = {type(m) for m in model.modules() if type(m) is not type(model)}
    shown = _display_names(types | set(_ADAPTERS))
    reasons = [
        f"{shown[type(m)]}: {why}"
        for m in _first_of_each_type(model)
        if (why := _why_not_a_block(m)) is not None
    ]
    return (
        f"No residual stage found in {type(model).__name__}: a stage is a run of at least two "
        f"blocks with an identity skip, of one type, that the model applies one after the "
        f"other. Registered block types: {', '.join(sorted(shown[t] for t in _ADAPTERS))}. "
        f"Other blocks are read from their torch.fx graph"
        + (f" ({'; '.join(reasons[:4])})" if reasons else "")
        + f". Module types seen: {', '.join(sorted(shown[t] for t in types)) or 'none'}. If your "
        f"blocks are residual, register their type with resode_lightning.register_block(MyBlock, "
        f"branch=lambda block, x: <what the block adds to x>, last_layer=<name of the branch's "
        f"last affine layer or None>, post=<activation after the sum or None>, "
        f"conv_bn_pairs=<(conv, norm) names>) and check it with example=MyBlock(...)."
        + "".join(_loop_skip_advice(m, shown) for m in _first_of_each_type(model, itself=True))
    )


def _loop_skip_advice(container: nn.Module, shown: dict[type, str]) -> str:
    owner = loop_skip_owner(container)
    if owner is None:
        return ""
    return (
        f" {shown.get(type(container), type(container).__name__)}.forward adds the output of "
        f"each module of {owner!r} to that module's input itself (a skip written in its loop), "
        f"so those modules are branches, not blocks: move the skip into them (their forward "
        f"returns x + f(x) / L, their state-dict keys unchanged) and let the loop apply them "
        f"one after the other (x = step(x)), as the docs' zoo page shows."
    )


def _display_names(types: set[type]) -> dict[type, str]:
    """Class names, qualified by module where two classes share a name."""
    counts: dict[str, int] = {}
    for cls in types:
        counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
    return {cls: qualified_name(cls) if counts[cls.__name__] > 1 else cls.__name__ for cls in types}


def _first_of_each_type(model: nn.Module, *, itself: bool = False) -> list[nn.Module]:
    first: dict[type, nn.Module] = {}
    for module in model.modules():
        if (itself or module is not model) and not type(module).__module__.startswith("torch."):
            first.setdefault(type(module), module)
    return list(first.values())


def _why_not_a_block(module: nn.Module) -> str | None:
    if adapter_for(module) is not None:
        return None
    reason = REASONS.get(module)
    if reason is None and block_graph(module) is None:
        reason = (
            "its graph shows no post(x + branch(x)) with its own input as the skip (or torch.fx "
            "could not trace its forward)"
        )
    return reason


def run_stage(stage: Stage, x: Tensor, blocks: list[nn.Module] | None = None) -> Tensor:
    """Apply the stage's blocks (or ``blocks`` built for it at another depth) to ``x``."""
    for block in stage.blocks if blocks is None else blocks:
        x = block(x)
    return x


def last_layer_name(block: nn.Module, adapter: BlockAdapter) -> str | None:
    """The state-dict name of the layer ending ``block``'s branch, or ``None``.

    It is the layer's submodule path, except in an ODE-form block: there the layer's
    :class:`~resode_lightning.core.step.ODEStep` lends it its own name (``bn2``).
    """
    last = adapter.last_layer(block)
    if last is None:
        return None
    for name, module in block.named_modules():
        if module is last:
            return state_dict_name(block, name)
    raise ValueError(f"last_layer of {type(block).__name__} is not one of its submodules")
