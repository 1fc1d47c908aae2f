"""Adapters of the RegNet family: torchvision's RegNet, timm's RegNet and ByobNet blocks.

Every model runs in eval mode with random BatchNorm statistics and affine parameters: timm
zero-initialises the last norm of each block, which would make every check pass trivially.
"""

import functools
import math

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from resode_lightning import (
    export_neural_ode,
    find_stages,
    resample_depth,
    smoothness_report,
    to_ode_form,
)
from resode_lightning.core.stages import last_layer_name
from resode_lightning.testing import randomize_norms

TORCHVISION = ["regnet_x_400mf", "regnet_y_400mf"]
SMALL_REGNET = {"depth": 13, "w0": 24, "wa": 36.44, "wm": 2.49, "group_size": 8}
TIMM = {
    "regnetx_002": {},  # regnet.Bottleneck, ReLU after the sum
    "regnety_002": {},  # with squeeze-excitation before conv3
    "regnetz_005": {},  # linear_out (no post map), SiLU, first blocks without shortcut
    "regnetv_040": SMALL_REGNET,  # regnet.PreBottleneck, at regnety_002's size
    "gernet_s": {},  # byobnet BasicBlock and BottleneckBlock, ReLU
    "regnetz_b16": {},  # byobnet BottleneckBlock: SE, linear_out, no-shortcut first blocks
    "byob_mixed": {},  # byobnet Edge/Dark/Basic/Bottleneck blocks, SE first or last
}
ARCHS = TORCHVISION + list(TIMM)


def _mixed_byobnet() -> nn.Module:
    """A small ByobNet with two or more identity blocks of each of the four residual types."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    blocks = (
        ByoBlockCfg(type="edge", d=3, c=32, s=2, br=0.5),
        ByoBlockCfg(type="dark", d=3, c=48, s=2, br=0.5),
        ByoBlockCfg(type="basic", d=3, c=64, s=2, gs=16, br=0.5),
        ByoBlockCfg(type="bottle", d=4, c=96, s=2, gs=8, br=0.25),
    )
    config = ByoModelCfg(
        blocks=blocks,
        stem_chs=16,
        stem_pool="",
        downsample="avg",
        act_layer="relu",
        attn_layer="se",
        attn_kwargs={"rd_ratio": 0.25},
    )
    return ByobNet(config, num_classes=10)


@functools.cache
def _cached_model(arch: str) -> nn.Module:
    if arch in TORCHVISION:
        model = tvm.get_model(arch, num_classes=10)
    elif arch == "byob_mixed":
        model = _mixed_byobnet()
    else:
        import timm

        model = timm.create_model(arch, num_classes=10, **TIMM[arch])
    return randomize_norms(model).eval()


def model(arch: str) -> nn.Module:
    """The randomised eval-mode model of ``arch`` (built once; tests must not modify it)."""
    if arch not in TORCHVISION:
        pytest.importorskip("timm")
    return _cached_model(arch)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


def outputs(net: nn.Module, other: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return other(x), net(x)


@pytest.mark.parametrize(
    ("arch", "depths"),
    [
        ("regnet_x_400mf", {"trunk_output.block3": 6, "trunk_output.block4": 11}),
        ("regnetz_005", {"s2": 3, "s3": 8, "s4": 6}),
        ("byob_mixed", {"stages.0": 2, "stages.1": 2, "stages.2": 2, "stages.3": 3}),
    ],
)
def test_stages_are_found_out_of_the_box(arch, depths):
    assert {stage.name: stage.depth for stage in find_stages(model(arch))} == depths


@pytest.mark.parametrize(
    ("arch", "stage", "block", "last", "post"),
    [
        ("regnet_y_400mf", 1, "ResBottleneckBlock", "f.c.1", nn.ReLU),
        ("regnety_002", 0, "Bottleneck", "conv3.bn", nn.ReLU),
        ("regnetz_005", 0, "Bottleneck", "conv3.bn", None),
        ("regnetv_040", 0, "PreBottleneck", None, None),
        ("gernet_s", 0, "BasicBlock", "conv2_kxk.bn", nn.ReLU),
        ("regnetz_b16", 0, "BottleneckBlock", "conv3_1x1.bn", None),
        ("byob_mixed", 0, "EdgeBlock", "conv2_1x1.bn", nn.ReLU),
        ("byob_mixed", 1, "DarkBlock", None, nn.ReLU),  # SE after the last norm
        ("byob_mixed", 2, "BasicBlock", None, nn.ReLU),  # SE after the last norm
        ("byob_mixed", 3, "BottleneckBlock", "conv3_1x1.bn", nn.ReLU),
    ],
)
def test_adapters_read_the_block_instance(arch, stage, block, last, post):
    found = find_stages(model(arch))[stage]
    first = found.blocks[0]
    assert type(first).__name__ == block
    assert last_layer_name(first, found.adapter) == last
    assert found.post is None if post is None else type(found.post) is post


@pytest.mark.parametrize("arch", ARCHS)
def test_ode_form_reproduces_the_model(arch):
    net = model(arch)
    output, reference = outputs(net, to_ode_form(net))
    assert relative_error(output, reference) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_euler_export_reproduces_the_model(arch):
    net = model(arch)
    output, reference = outputs(net, export_neural_ode(net))
    assert relative_error(output, reference) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothness_report_is_finite(arch):
    rows = smoothness_report(model(arch))
    assert rows
    for row in rows:
        for metric in ("weight_norm", "lipschitz", "total_variation", "relative_roughness"):
            assert math.isfinite(row[metric]), (row["stage"], metric)
        assert math.isfinite(row["curvature"]) == (row["depth"] >= 3)  # NaN below 3 blocks


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        ("regnet_x_400mf", ["block4-0", "block4-1", "block4-2"]),
        ("regnetx_002", ["b1", "b2", "b3"]),
    ],
)
def test_resample_depth_in_named_containers(arch, names):
    net = model(arch)
    resampled = resample_depth(net, 2)
    stages = find_stages(resampled)
    assert [stage.depth for stage in stages] == [2] * len(stages)
    assert list(stages[-1].container._modules) == names
    output, reference = outputs(net, resampled)
    assert output.shape == reference.shape and torch.isfinite(output).all()


def test_resample_depth_needs_a_last_layer():
    net = model("byob_mixed")
    with pytest.raises(ValueError, match="no layer ending its branch"):
        resample_depth(net, 3)
    resampled = resample_depth(net, {"stages.0": 3, "stages.3": 2})
    assert [stage.depth for stage in find_stages(resampled)] == [3, 2, 2, 2]
