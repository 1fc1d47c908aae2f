"""Adapters for torchvision's residual blocks: ResNet's BasicBlock and Bottleneck."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from resode_lightning.core.blocks import register_block


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
