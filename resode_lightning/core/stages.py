"""Residual stages: runs of shape-preserving residual blocks, found through block adapters.

A stage of L blocks computes ``x_{k+1} = P(x_k + h * F_k(x_k))``. A :class:`BlockAdapter`
tells, for one block type, how to call its residual branch, which layer ends the branch
(the one the ODE-form rescale multiplies) and the post-step map ``P``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

MARKER = "ode_horizon"
"""Name (or prefix) of the persistent buffer that marks a stage as converted to ODE form."""


@dataclass(frozen=True)
class BlockAdapter:
    """How the package reads one residual block type.

    Args:
        branch: ``branch(block, x)``: the increment the block adds to ``x`` before ``post``,
            so that ``block(x) == post(x + branch(block, x))``.
        last_layer: ``last_layer(block)``: the affine layer that ends the branch (a norm
            layer with affine weight and bias, or a conv/linear layer), or ``None`` when the
            branch ends in no rescalable layer; the stage then applies the factor ``L / horizon``
            itself when it reads the vector field.
        post: the post-step map ``P`` (``None`` for the identity: an exact Euler step).
        is_identity_skip: whether a block's skip connection is the identity (it keeps shape).
        step_attribute: name of the block attribute holding its own step ``h``, for blocks that
            compute ``x + h * F(x)`` natively; ``None`` when the package scales the last layer's
            output with a forward hook instead.
        conv_bn_pairs: ``(conv, norm)`` submodule names that can be fused in eval mode.
    """

    branch: Callable[[nn.Module, Tensor], Tensor]
    last_layer: Callable[[nn.Module], nn.Module | None]
    post: Callable[[Tensor], Tensor] | None = None
    is_identity_skip: Callable[[nn.Module], bool] = lambda block: True
    step_attribute: str | None = None
    conv_bn_pairs: tuple[tuple[str, str], ...] = ()


_ADAPTERS: dict[type[nn.Module], BlockAdapter] = {}


def register_block(
    block_type: type[nn.Module],
    *,
    branch: Callable[[nn.Module, Tensor], Tensor],
    last_layer: str | Callable[[nn.Module], nn.Module | None] | None = None,
    post: Callable[[Tensor], Tensor] | None = None,
    is_identity_skip: Callable[[nn.Module], bool] | None = None,
    step_attribute: str | None = None,
    conv_bn_pairs: tuple[tuple[str, str], ...] = (),
) -> BlockAdapter:
    """Teach the package a residual block type of your own.

    Args:
        block_type: the ``nn.Module`` subclass of the block.
        branch: ``branch(block, x)`` returns what the block adds to ``x`` (its residual branch).
        last_layer: the submodule name (e.g. ``"bn2"``) or a function returning the layer that
            ends the branch. When ``None``, the ODE form leaves the weights as they are and the
            factor ``L / horizon`` is applied to the branch output when the field is read.
        post: the map applied after the sum (``torch.relu`` for post-activation blocks).
        is_identity_skip: whether a given block keeps its input shape (default: always).
        step_attribute: attribute through which the block applies its own step, if any.
        conv_bn_pairs: conv/norm submodule name pairs that can be fused for export.

    Returns:
        The registered adapter.

    Example::

        >>> class MyBlock(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(8, 8, 3, padding=1)
        ...     def forward(self, x):
        ...         return x + self.conv(torch.tanh(x))
        >>> def branch(block, x):
        ...     return block.conv(torch.tanh(x))
        >>> _ = register_block(MyBlock, branch=branch, last_layer="conv")
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f"block_type must be an nn.Module subclass, got {block_type!r}")
    if not callable(branch):
        raise TypeError("branch must be a callable branch(block, x) -> Tensor")
    if isinstance(last_layer, str):
        layer_name = last_layer

        def last_layer_fn(block: nn.Module) -> nn.Module:
            return block.get_submodule(layer_name)

    else:
        last_layer_fn = last_layer if last_layer is not None else _no_last_layer
    adapter = BlockAdapter(
        branch=branch,
        last_layer=last_layer_fn,
        post=post,
        is_identity_skip=is_identity_skip or _always,
        step_attribute=step_attribute,
        conv_bn_pairs=tuple(conv_bn_pairs),
    )
    _ADAPTERS[block_type] = adapter
    return adapter


def adapter_for(block: nn.Module) -> BlockAdapter | None:
    """The adapter registered for ``block``'s type (or its nearest registered base class)."""
    for cls in type(block).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def _always(block: nn.Module) -> bool:
    return True


def _no_last_layer(block: nn.Module) -> None:
    return None


def _no_downsample(block: nn.Module) -> bool:
    return block.downsample is None and _conv_stride(block) == 1


def _conv_stride(block: nn.Module) -> int:
    conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    stride = conv.stride
    return stride[0] if isinstance(stride, tuple) else stride


def _last_norm_or_conv(norm_name: str, conv_name: str) -> Callable[[nn.Module], nn.Module | None]:
    """The norm layer ending a torchvision branch when it is affine, else ``None``.

    With ``affine=False`` (or a norm with no scale at all) the conv before it cannot carry
    the factor, since the norm divides it out.
    """

    def last(block: nn.Module) -> nn.Module | None:
        norm = getattr(block, norm_name)
        if isinstance(norm, nn.Identity):
            return getattr(block, conv_name)
        if getattr(norm, "weight", None) is None:
            return None
        return norm

    return last


def _basic_branch(block: BasicBlock, x: Tensor) -> Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    return block.bn2(block.conv2(out))


def _bottleneck_branch(block: Bottleneck, x: Tensor) -> Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out))


register_block(
    BasicBlock,
    branch=_basic_branch,
    last_layer=_last_norm_or_conv("bn2", "conv2"),
    post=F.relu,
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2")),
)
register_block(
    Bottleneck,
    branch=_bottleneck_branch,
    last_layer=_last_norm_or_conv("bn3", "conv3"),
    post=F.relu,
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
)


@dataclass
class Stage:
    """An ordered run of at least two residual blocks of one type with identical state shape.

    Attributes:
        name: stable name: the container's module path (``layer3``), with ``[i:j]`` appended
            when the container holds more than one stage.
        container: the ``nn.Sequential`` or ``nn.ModuleList`` that holds the blocks.
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

    Blocks are children of an ``nn.Sequential`` or ``nn.ModuleList``; a block whose skip
    changes shape (a downsampling block), or a block of another type, ends a run.

    Raises:
        ValueError: when the model holds no residual stage; the message lists the block types
            seen and says how to register one.
    """
    stages: list[Stage] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or _inside_block(model, path):
            continue
        runs = _identity_runs(list(module.children()))
        for start, stop in runs:
            name = path or type(model).__name__
            marker = MARKER
            if len(runs) > 1:
                name = f"{name}[{start}:{stop}]"
                marker = f"{MARKER}_{start}"
            adapter = adapter_for(list(module.children())[start])
            stages.append(Stage(name, module, list(range(start, stop)), adapter, marker))
    if not stages:
        raise ValueError(_no_stage_message(model))
    return stages


def _inside_block(model: nn.Module, path: str) -> bool:
    parts = path.split(".") if path else []
    module = model
    for part in parts[:-1]:
        module = module.get_submodule(part)
        if adapter_for(module) is not None:
            return True
    return False


def _identity_runs(children: list[nn.Module]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = None
    for i, child in enumerate([*children, None]):
        adapter = adapter_for(child) if child is not None else None
        keeps = adapter is not None and adapter.is_identity_skip(child)
        same_type = start is not None and keeps and type(child) is type(children[start])
        if start is not None and not same_type:
            if i - start >= 2:
                runs.append((start, i))
            start = None
        if keeps and start is None:
            start = i
    return runs


def _no_stage_message(model: nn.Module) -> str:
    seen = sorted({type(m).__name__ for m in model.modules() if type(m) is not type(model)})
    known = sorted(t.__name__ for t in _ADAPTERS)
    return (
        f"No residual stage found in {type(model).__name__}: a stage is a run of at least two "
        f"consecutive identity-skip residual blocks in an nn.Sequential or nn.ModuleList. "
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
    """The submodule path of the layer ending ``block``'s branch, or ``None``."""
    last = adapter.last_layer(block)
    if last is None:
        return None
    for name, module in block.named_modules():
        if module is last:
            return name
    raise ValueError(f"last_layer of {type(block).__name__} is not one of its submodules")


def scaled_tensors(layer: nn.Module) -> list[Tensor]:
    """The tensors of ``layer`` that the ODE-form rescale multiplies: affine weight and bias."""
    return [
        t for t in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if t is not None
    ]
