"""Stages watched during training: their live tensors, read once, and whether they still hold.

A training loop measures the same stages many times; finding them and reading their tensors
every time would cost more than the metrics. :func:`watch_stages` does it once, and
:meth:`WatchedStage.is_current` says, from object identities alone (no tensor read, no host
sync), whether the model still holds what was read: a replaced block, parameter or ODE marker
calls for watching again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resode_lightning.core.metrics import ALL
from resode_lightning.core.parameters import stage_tensors
from resode_lightning.core.stages import Stage, find_stages


class WatchedStage:
    """One stage's live parameter tensors and lifts, and the objects they were read from.

    Holding those objects keeps them alive, so identity checks on them cannot be fooled by a
    reused ``id()``.

    Attributes:
        stage: the stage.
        tensors, lifts: its per-name block tensors and their lifts
            (:func:`~resode_lightning.core.parameters.stage_tensors`).
        names: ``ALL`` then every tensor name: the columns of the stage's metric table.
    """

    def __init__(self, stage: Stage, path: list[tuple[nn.Module, str, nn.Module]]) -> None:
        self.stage = stage
        self.tensors, self.lifts = stage_tensors(stage)
        self.names = (ALL, *self.tensors)
        self._path = path
        self._children = list(stage.container._modules.values())
        self._marker = stage.container._buffers.get(stage.marker)
        self._block_parameters = [tuple(block.parameters()) for block in stage.blocks]

    def is_current(self) -> bool:
        """Whether the model still holds this stage as it was read (no tensor is read)."""
        container = self.stage.container
        modules = container._modules.values()
        return (
            all(parent._modules.get(name) is child for parent, name, child in self._path)
            and container._buffers.get(self.stage.marker) is self._marker
            and len(modules) == len(self._children)
            and all(a is b for a, b in zip(modules, self._children, strict=True))
            and all(
                _same(tuple(block.parameters()), held)
                for block, held in zip(self.stage.blocks, self._block_parameters, strict=True)
            )
        )


def watch_stages(model: nn.Module) -> list[WatchedStage]:
    """Every residual stage of ``model``, watched.

    Raises:
        ValueError: ``model`` has no residual stage (from :func:`find_stages`).
    """
    paths = {module: name for name, module in model.named_modules()}
    watched = []
    for stage in find_stages(model):
        path, parent = [], model
        for name in paths[stage.container].split(".") if paths[stage.container] else []:
            child = parent._modules[name]
            path.append((parent, name, child))
            parent = child
        watched.append(WatchedStage(stage, path))
    return watched


def stage_inputs(model: nn.Module, stages: list[Stage], x: Tensor) -> dict[str, Tensor]:
    """The input each stage receives when ``model`` runs on ``x``, by stage name (no grad).

    A stage the forward pass does not reach is left out.
    """
    inputs: dict[str, Tensor] = {}
    handles = [
        stage.blocks[0].register_forward_pre_hook(_Capture(stage.name, inputs)) for stage in stages
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class _Capture:
    """Forward pre-hook storing a module's input under ``name`` (picklable, no closure)."""

    def __init__(self, name: str, store: dict[str, Tensor]) -> None:
        self.name = name
        self.store = store

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.store.setdefault(self.name, args[0].detach())
