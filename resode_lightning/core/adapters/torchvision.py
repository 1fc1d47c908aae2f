"""Adapters for torchvision's residual blocks: ResNet's BasicBlock and Bottleneck, RegNet's
ResBottleneckBlock."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import BasicBlock, Bottleneck

from resode_lightning.core.registry import register_block


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


def _regnet_no_projection(block: ResBottleneckBlock) -> bool:
    stride = block.f.b[0].stride
    return block.proj is None and (stride[0] if isinstance(stride, tuple) else stride) == 1


def _regnet_branch(block: ResBottleneckBlock, x: Tensor) -> Tensor:
    return block.f(x)


def _regnet_last_layer(block: ResBottleneckBlock) -> nn.Module | None:
    """The norm of ``f.c`` (its conv when it has none); ``None`` when the norm has no scale.

    The squeeze-excitation gate of RegNet-Y sits before ``f.c``, so it never ends the branch.
    """
    unit = block.f.c
    if len(unit) == 1:
        return unit[0]
    return unit[1] if getattr(unit[1], "weight", None) is not None else None


def _regnet_pairs(block: ResBottleneckBlock) -> tuple[tuple[str, str], ...]:
    """``(conv, BatchNorm)`` of each of ``f.a``, ``f.b``, ``f.c`` that has a BatchNorm."""
    units = {name: getattr(block.f, name) for name in ("a", "b", "c")}
    return tuple(
        (f"f.{name}.0", f"f.{name}.1")
        for name, unit in units.items()
        if len(unit) > 1 and isinstance(unit[1], _BatchNorm)
    )


register_block(
    ResBottleneckBlock,
    branch=_regnet_branch,
    last_layer=_regnet_last_layer,
    post="activation",
    is_identity_skip=_regnet_no_projection,
    conv_bn_pairs=_regnet_pairs,
)
