"""Residual stages: runs of shape-preserving residual blocks, found through block adapters.

A stage of L blocks computes ``x_{k+1} = P(x_k + h * F_k(x_k))``. A
:class:`~resode_lightning.core.blocks.BlockAdapter` tells, for one block type, how to call its
residual branch, which layer ends the branch (the one the ODE-form rescale multiplies) and the
post-step map ``P``. Blocks are found in any container (``nn.Sequential``, ``nn.ModuleList``,
timm's ``RegStage``, modules with named children), never inside a registered block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from resode_lightning.core.adapters import register_timm_if_imported
from resode_lightning.core.blocks import (
    _ADAPTERS,
    BlockAdapter,
    Post,
    adapter_for,
    verify_block,
)
from resode_lightning.core.step import state_dict_name

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
    is verified once on a probe (:func:`~resode_lightning.core.blocks.verify_block`).

    Raises:
        ValueError: when the model holds no residual stage; the message lists the block types
            seen and says how to register one.
        BlockAdapterError: a registered adapter does not describe its block.
    """
    register_timm_if_imported()
    stages: list[Stage] = []
    for path, module in _containers(model, ""):
        children = list(module.children())
        runs = _identity_runs(children)
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
    seen = sorted({type(m).__name__ for m in model.modules() if type(m) is not type(model)})
    known = sorted({t.__name__ for t in _ADAPTERS})
    return (
        f"No residual stage found in {type(model).__name__}: a stage is a run of at least two "
        f"consecutive identity-skip residual blocks of one registered type in a container. "
        f"Known block types: {', '.join(known)}. Module types seen: {', '.join(seen) or 'none'}. "
        f"If your blocks are residual, register their type with "
        f"resode_lightning.register_block(MyBlock, branch=lambda block, x: ..., last_layer='bn2')."
    )


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


def scaled_tensors(layer: nn.Module) -> list[Tensor]:
    """The tensors of ``layer`` that the ODE-form rescale multiplies: affine weight and bias."""
    return [
        t for t in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if t is not None
    ]
