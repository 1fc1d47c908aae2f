"""Adapters for timm's ResNet families.

Covers ``timm.models.resnet`` (ResNet, its -d/-t/-s variants, ResNeXt, wide, SE/ECA/GC
attention, ResNet-RS, anti-aliased and blur-pool ResNets), ``resnetv2`` (pre-activation,
BiT and non-pre-activation blocks), ``senet`` (legacy SENet, SE-ResNet, SE-ResNeXt), ``sknet``,
``res2net`` and ``resnest``. Imported by :mod:`resode_lightning.core.adapters` only once
``timm`` has been imported.

Every adapter reads the block instance: its own activation, whether an attention gate follows
its last norm (the branch then has no last layer that scales it linearly), its drop-path (kept
in the branch: the identity in eval mode) and the conv/norm pairs it holds.
"""

from __future__ import annotations

import torch
from timm.layers import ConvNormAct
from timm.layers.selective_kernel import SelectiveKernelAttn
from timm.layers.split_attn import SplitAttn
from timm.models.res2net import Bottle2neck
from timm.models.resnest import ResNestBottleneck
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.resnetv2 import Bottleneck as V2Bottleneck
from timm.models.resnetv2 import PreActBasic, PreActBottleneck
from timm.models.senet import SEBottleneck, SEResNetBlock, SEResNetBottleneck, SEResNeXtBottleneck
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resode_lightning.core.blocks import Pairs, is_plain_conv
from resode_lightning.core.registry import register_block

# ----------------------------------------------------------------------------- shared


def _no_downsample(block: nn.Module) -> bool:
    """Whether the block's skip is the identity (timm gives every strided block a downsample)."""
    return block.downsample is None


def _is_affine_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is an affine BatchNorm or GroupNorm with no activation or dropout."""
    if not isinstance(norm, (_BatchNorm, nn.GroupNorm)) or norm.weight is None:
        return False
    extras = [getattr(norm, name, None) for name in ("act", "drop")]
    return all(extra is None or isinstance(extra, nn.Identity) for extra in extras)


def _ending_norm(block: nn.Module, norm: nn.Module) -> nn.Module | None:
    """``norm`` when it ends the branch linearly: affine, and no attention gate (``se``) after."""
    if getattr(block, "se", None) is not None or not _is_affine_norm(norm):
        return None
    return norm


def _ending_conv_norm_act(block: nn.Module, unit: ConvNormAct) -> nn.Module | None:
    """The norm of a ``ConvNormAct`` ending the branch, when nothing non-linear follows it."""
    return _ending_norm(block, unit.bn) if getattr(unit, "aa", None) is None else None


def _ending_plain_conv(conv: nn.Module) -> nn.Module | None:
    """``conv`` when it is a plain convolution (a weight-standardised one does not scale)."""
    return conv if is_plain_conv(conv) else None


def _gate_and_drop_path(block: nn.Module, x: Tensor) -> Tensor:
    """The block's optional attention gate (``se``) and drop-path, applied to ``x``."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    return x


def _composite_pairs(block: nn.Module) -> Pairs:
    """The conv/norm pairs inside timm's composite layers of ``block``."""
    pairs: list[tuple[str, str]] = []
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ConvNormAct):
            pairs.append((f"{prefix}conv", f"{prefix}bn"))
        elif isinstance(module, SelectiveKernelAttn):
            pairs.append((f"{prefix}fc_reduce", f"{prefix}bn"))
        elif isinstance(module, SplitAttn):
            pairs += [(f"{prefix}conv", f"{prefix}bn0"), (f"{prefix}fc1", f"{prefix}bn1")]
    return tuple(pairs)


# ----------------------------------------------------------------------------- timm.models.resnet


def _resnet_basic_branch(block: BasicBlock, x: Tensor) -> Tensor:
    x = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
    x = block.bn2(block.conv2(x))
    return _gate_and_drop_path(block, x)


def _resnet_bottleneck_branch(block: Bottleneck, x: Tensor) -> Tensor:
    x = block.act1(block.bn1(block.conv1(x)))
    x = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(x)))))
    x = block.bn3(block.conv3(x))
    return _gate_and_drop_path(block, x)


def _last_bn2(block: nn.Module) -> nn.Module | None:
    return _ending_norm(block, block.bn2)


def _last_bn3(block: nn.Module) -> nn.Module | None:
    return _ending_norm(block, block.bn3)


register_block(
    BasicBlock,
    branch=_resnet_basic_branch,
    last_layer=_last_bn2,
    post="act2",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2")),
)
register_block(
    Bottleneck,
    branch=_resnet_bottleneck_branch,
    last_layer=_last_bn3,
    post="act3",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
)

# ----------------------------------------------------------------------------- timm.models.resnetv2


def _preact_basic_branch(block: PreActBasic, x: Tensor) -> Tensor:
    x = block.conv1(block.norm1(x))
    x = block.conv2(block.norm2(x))
    return block.drop_path(x)


def _preact_bottleneck_branch(block: PreActBottleneck, x: Tensor) -> Tensor:
    x = block.conv1(block.norm1(x))
    x = block.conv2(block.norm2(x))
    x = block.conv3(block.norm3(x))
    return block.drop_path(x)


def _v2_bottleneck_branch(block: V2Bottleneck, x: Tensor) -> Tensor:
    x = block.norm1(block.conv1(x))
    x = block.norm2(block.conv2(x))
    x = block.norm3(block.conv3(x))
    return block.drop_path(x)


def _last_preact_basic(block: PreActBasic) -> nn.Module | None:
    return _ending_plain_conv(block.conv2)


def _last_preact_bottleneck(block: PreActBottleneck) -> nn.Module | None:
    return _ending_plain_conv(block.conv3)


def _last_norm3(block: V2Bottleneck) -> nn.Module | None:
    return _ending_norm(block, block.norm3)


register_block(
    PreActBasic,
    branch=_preact_basic_branch,
    last_layer=_last_preact_basic,
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "norm2"),),
)
register_block(
    PreActBottleneck,
    branch=_preact_bottleneck_branch,
    last_layer=_last_preact_bottleneck,
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "norm2"), ("conv2", "norm3")),
)
register_block(
    V2Bottleneck,
    branch=_v2_bottleneck_branch,
    last_layer=_last_norm3,
    post="act3",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "norm1"), ("conv2", "norm2"), ("conv3", "norm3")),
)

# ----------------------------------------------------------------------------- timm.models.senet


def _senet_bottleneck_branch(block: nn.Module, x: Tensor) -> Tensor:
    x = block.relu(block.bn1(block.conv1(x)))
    x = block.relu(block.bn2(block.conv2(x)))
    return block.se_module(block.bn3(block.conv3(x)))


def _senet_basic_branch(block: SEResNetBlock, x: Tensor) -> Tensor:
    x = block.relu(block.bn1(block.conv1(x)))
    x = block.relu(block.bn2(block.conv2(x)))
    return block.se_module(x)


for _senet_bottleneck in (SEBottleneck, SEResNetBottleneck, SEResNeXtBottleneck):
    register_block(
        _senet_bottleneck,
        branch=_senet_bottleneck_branch,
        post="relu",
        is_identity_skip=_no_downsample,
        conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    )
register_block(
    SEResNetBlock,
    branch=_senet_basic_branch,
    post="relu",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2")),
)

# ----------------------------------------------------------------------------- timm.models.sknet


def _sk_basic_branch(block: SelectiveKernelBasic, x: Tensor) -> Tensor:
    return _gate_and_drop_path(block, block.conv2(block.conv1(x)))


def _sk_bottleneck_branch(block: SelectiveKernelBottleneck, x: Tensor) -> Tensor:
    return _gate_and_drop_path(block, block.conv3(block.conv2(block.conv1(x))))


def _last_sk_basic(block: SelectiveKernelBasic) -> nn.Module | None:
    return _ending_conv_norm_act(block, block.conv2)


def _last_sk_bottleneck(block: SelectiveKernelBottleneck) -> nn.Module | None:
    return _ending_conv_norm_act(block, block.conv3)


register_block(
    SelectiveKernelBasic,
    branch=_sk_basic_branch,
    last_layer=_last_sk_basic,
    post="act",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=_composite_pairs,
)
register_block(
    SelectiveKernelBottleneck,
    branch=_sk_bottleneck_branch,
    last_layer=_last_sk_bottleneck,
    post="act",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=_composite_pairs,
)

# ----------------------------------------------------------------------------- timm.models.res2net


def _res2net_branch(block: Bottle2neck, x: Tensor) -> Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    splits = torch.split(out, block.width, 1)
    outs = []
    part = splits[0]
    for i, (conv, bn) in enumerate(zip(block.convs, block.bns, strict=True)):
        part = splits[i] if i == 0 or block.is_first else part + splits[i]
        part = block.relu(bn(conv(part)))
        outs.append(part)
    if block.scale > 1:
        outs.append(block.pool(splits[-1]) if block.pool is not None else splits[-1])
    out = block.drop_block(torch.cat(outs, 1))
    out = block.bn3(block.conv3(out))
    return _gate_and_drop_path(block, out)


def _res2net_pairs(block: Bottle2neck) -> Pairs:
    scales = tuple((f"convs.{i}", f"bns.{i}") for i in range(len(block.convs)))
    return (("conv1", "bn1"), *scales, ("conv3", "bn3"))


register_block(
    Bottle2neck,
    branch=_res2net_branch,
    last_layer=_last_bn3,
    post="relu",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=_res2net_pairs,
)

# ----------------------------------------------------------------------------- timm.models.resnest


def _resnest_branch(block: ResNestBottleneck, x: Tensor) -> Tensor:
    """The branch of a ResNeSt block: no drop-path, since timm applies it to the block's input,
    which an identity skip discards."""
    out = block.act1(block.bn1(block.conv1(x)))
    if block.avd_first is not None:
        out = block.avd_first(out)
    out = block.act2(block.drop_block(block.bn2(block.conv2(out))))
    if block.avd_last is not None:
        out = block.avd_last(out)
    return block.bn3(block.conv3(out))


def _resnest_pairs(block: ResNestBottleneck) -> Pairs:
    middle = (("conv2", "bn2"),) if isinstance(block.conv2, nn.Conv2d) else ()
    return (("conv1", "bn1"), *middle, ("conv3", "bn3"), *_composite_pairs(block))


register_block(
    ResNestBottleneck,
    branch=_resnest_branch,
    last_layer=_last_bn3,
    post="act3",
    is_identity_skip=_no_downsample,
    conv_bn_pairs=_resnest_pairs,
)
