"""Adapters for timm's RegNet blocks and the residual blocks of its ByobNet family.

``regnet.Bottleneck`` and ``regnet.PreBottleneck`` (RegNet-X/Y/Z/V), and byobnet's
``BasicBlock``, ``BottleneckBlock``, ``DarkBlock`` and ``EdgeBlock`` (GerNet, RegNetZ-B/C/D/E,
the ResNet-ts family). Every field reads the block instance: its activation (ReLU, SiLU or none
with ``linear_out``), its attention gates and its norms. A shortcut of ``None`` means no skip
at all (the block is not residual), ``nn.Identity`` the identity skip. RepVGG and MobileOne
blocks (re-parametrisable branches) and SelfAttnBlock (fixed feature size) are not covered.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models import byobnet, regnet
from torch import Tensor, nn

from resode_lightning.core.blocks import Pairs
from resode_lightning.core.registry import register_block


class _Chain:
    """The branch as the block's named submodules applied in order (picklable)."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def __call__(self, block: nn.Module, x: Tensor) -> Tensor:
        for name in self.names:
            x = getattr(block, name)(x)
        return x


class _IsIdentity:
    """Whether the block's named shortcut is the identity (picklable)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, block: nn.Module) -> bool:
        return isinstance(getattr(block, self.name), nn.Identity)


class _LastNorm:
    """The layer ending the branch's last conv unit, ``None`` when a gate or activation follows.

    It is the unit's norm when the norm is affine with no fused activation, the unit's conv when
    the unit has no norm; ``None`` for a non-affine norm or when the attention gate ``gate`` is
    not ``nn.Identity``.
    """

    def __init__(self, unit: str, gate: str | None = None) -> None:
        self.unit = unit
        self.gate = gate

    def __call__(self, block: nn.Module) -> nn.Module | None:
        if self.gate is not None and not isinstance(getattr(block, self.gate), nn.Identity):
            return None
        unit = getattr(block, self.unit)
        if isinstance(unit.bn, nn.Sequential):  # ConvNormAct(apply_norm=False)
            return unit.conv
        act = getattr(unit.bn, "act", None)
        if not (act is None or isinstance(act, nn.Identity)):
            return None
        return unit.bn if getattr(unit.bn, "weight", None) is not None else None


class _UnitPairs:
    """``(conv, norm)`` of each named submodule that is a ``ConvNormAct`` (picklable).

    Only pairs whose norm is a plain BatchNorm (no fused activation) are folded on export.
    """

    def __init__(self, *units: str) -> None:
        self.units = units

    def __call__(self, block: nn.Module) -> Pairs:
        return tuple(
            (f"{name}.conv", f"{name}.bn")
            for name in self.units
            if isinstance(getattr(block, name), ConvNormAct)
        )


def _pre_bottleneck_branch(block: regnet.PreBottleneck, x: Tensor) -> Tensor:
    """``block(x) - x``: the skip starts after ``norm1``, so ``norm1(x) - x`` is in it."""
    y = block.norm1(x)
    out = block.conv1(y)
    out = block.conv2(block.norm2(out))
    out = block.conv3(block.norm3(block.se(out)))
    return y - x + block.drop_path(out)


def _pre_bottleneck_pairs(block: regnet.PreBottleneck) -> Pairs:
    """Convs a norm directly follows: ``conv1``/``norm2``, ``conv2``/``norm3`` without SE."""
    pairs = (("conv1", "norm2"),)
    return pairs + ((("conv2", "norm3"),) if isinstance(block.se, nn.Identity) else ())


register_block(
    regnet.Bottleneck,
    branch=_Chain("conv1", "conv2", "se", "conv3", "drop_path"),
    last_layer=_LastNorm("conv3"),
    post="act3",
    is_identity_skip=_IsIdentity("downsample"),
    conv_bn_pairs=_UnitPairs("conv1", "conv2", "conv3"),
)
register_block(
    regnet.PreBottleneck,
    branch=_pre_bottleneck_branch,
    last_layer=None,
    is_identity_skip=_IsIdentity("downsample"),
    conv_bn_pairs=_pre_bottleneck_pairs,
)


def _register_byob(block_type: type[nn.Module], units: tuple[str, ...]) -> None:
    """Register a byobnet block whose branch is ``units``, then ``attn_last`` and ``drop_path``."""
    register_block(
        block_type,
        branch=_Chain(*units, "attn_last", "drop_path"),
        last_layer=_LastNorm(units[-1], gate="attn_last"),
        post="act",
        is_identity_skip=_IsIdentity("shortcut"),
        conv_bn_pairs=_UnitPairs(*(name for name in units if name != "attn")),
    )


_register_byob(byobnet.BasicBlock, ("conv1_kxk", "attn", "conv2_kxk"))
_register_byob(
    byobnet.BottleneckBlock, ("conv1_1x1", "conv2_kxk", "conv2b_kxk", "attn", "conv3_1x1")
)
_register_byob(byobnet.DarkBlock, ("conv1_1x1", "attn", "conv2_kxk"))
_register_byob(byobnet.EdgeBlock, ("conv1_kxk", "attn", "conv2_1x1"))
