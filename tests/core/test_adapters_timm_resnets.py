"""timm's ResNet families: stages found out of the box, lossless ODE form and export."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from resode_lightning import export_neural_ode, find_stages, smoothness_report, to_ode_form
from resode_lightning.core.adapters import register_timm_if_imported
from resode_lightning.core.registry import adapter_for
from resode_lightning.testing import randomize_norms

timm = pytest.importorskip("timm")

from timm.layers import BatchNormAct2d, DropBlock2d, DropPath, create_conv2d  # noqa: E402
from timm.models import res2net, resnest, resnet, resnetv2, sknet  # noqa: E402

TOLERANCE = 1e-5
LAYER1 = [("layer1", 2)]
LAYERS_50 = [("layer1", 2), ("layer2", 3), ("layer3", 5), ("layer4", 2)]
STAGES_50 = [(f"stages.{i}.blocks", depth) for i, (_, depth) in enumerate(LAYERS_50)]

# name: (create_model keyword arguments, [(stage name, depth), ...])
ARCHS: dict[str, tuple[dict, list[tuple[str, int]]]] = {
    "resnet18d": ({"drop_path_rate": 0.1}, LAYER1),
    "resnet34d": ({}, [("layer1", 3), ("layer2", 3), ("layer3", 5), ("layer4", 2)]),
    "resnetblur18": ({}, LAYER1),
    "resnet50d": ({"drop_block_rate": 0.1}, LAYERS_50),
    "seresnext50_32x4d": ({}, LAYERS_50),
    "ecaresnet50t": ({}, LAYERS_50),
    "resnetrs50": ({}, LAYERS_50),
    "resnet50_gn": ({}, LAYERS_50),
    "resnetv2_18": ({}, [("stages.0.blocks", 2)]),
    "resnetv2_50": ({"drop_path_rate": 0.1}, STAGES_50),
    "resnetv2_50x1_bit": ({}, STAGES_50),
    "resnetv2_50d": ({"preact": False}, STAGES_50),  # resnetv2.Bottleneck
    "legacy_seresnet18": ({}, LAYER1),
    "legacy_seresnet50": ({}, LAYERS_50),
    "legacy_seresnext50_32x4d": ({}, LAYERS_50),
    "legacy_senet154": ({"layers": (3, 1, 1, 1)}, LAYER1),  # SEBottleneck, made small
    "skresnet18": ({}, LAYER1),
    "skresnext50_32x4d": ({"drop_path_rate": 0.1}, LAYERS_50),
    "res2net50_14w_8s": ({}, LAYERS_50),
    "resnest50d": ({"drop_path_rate": 0.1}, LAYERS_50),
}


def _relative(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_importing_the_package_does_not_import_timm_and_adapters_register_lazily():
    script = (
        "import sys, resode_lightning as rl\n"
        "assert 'timm' not in sys.modules\n"
        "import timm\n"
        "from timm.models.resnet import BasicBlock\n"
        "assert BasicBlock not in rl.registered_blocks()\n"
        "rl.find_stages(timm.create_model('resnet18', num_classes=10))\n"
        "assert BasicBlock in rl.registered_blocks()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


@pytest.mark.parametrize("arch", ["resnet26d", "legacy_seresnext26_32x4d", "resnest14d"])
def test_archs_with_one_identity_block_per_stage_have_no_stage(arch: str):
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match="No residual stage"):
        find_stages(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_ode_form_and_export_reproduce_the_model(arch: str):
    kwargs, expected = ARCHS[arch]
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    model = randomize_norms(model).eval()
    stages = find_stages(model)
    assert [(stage.name, stage.depth) for stage in stages] == expected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected_out = model(x)
        ode_error = _relative(to_ode_form(model)(x), expected_out)
        export_error = _relative(export_neural_ode(model)(x), expected_out)
    assert ode_error <= TOLERANCE, f"{arch}: ODE form differs by {ode_error:.2g}"
    assert export_error <= TOLERANCE, f"{arch}: export differs by {export_error:.2g}"
    rows = smoothness_report(model)
    assert [row["stage"] for row in rows] == [stage.name for stage in stages]
    for row in rows:
        undefined = {"curvature"} if row["depth"] < 3 else set()  # curvature needs three blocks
        values = [v for k, v in row.items() if isinstance(v, float) and k not in undefined]
        assert all(math.isfinite(value) for value in values), row


def test_resnet34d_stages_are_all_four_layers_minus_their_first_block():
    model = timm.create_model("resnet34d", pretrained=False, num_classes=10)
    stages = find_stages(model)
    assert [(stage.name, stage.indices) for stage in stages] == [
        ("layer1", [0, 1, 2]),
        ("layer2", [1, 2, 3]),
        ("layer3", [1, 2, 3, 4, 5]),
        ("layer4", [1, 2]),
    ]


BLOCKS = {
    "resnet.BasicBlock+se": lambda: resnet.BasicBlock(
        32, 32, attn_layer="se", drop_path=DropPath(0.5)
    ),
    "resnet.Bottleneck+dropblock": lambda: resnet.Bottleneck(
        32,
        8,
        drop_block=partial(DropBlock2d, drop_prob=0.5, block_size=3),
        drop_path=DropPath(0.5),
    ),
    "resnetv2.PreActBottleneck": lambda: resnetv2.PreActBottleneck(
        32, 32, conv_layer=create_conv2d, norm_layer=BatchNormAct2d, drop_path_rate=0.5
    ),
    "resnetv2.Bottleneck": lambda: resnetv2.Bottleneck(
        32, 32, conv_layer=create_conv2d, norm_layer=BatchNormAct2d, drop_path_rate=0.5
    ),
    "sknet.SelectiveKernelBasic": lambda: sknet.SelectiveKernelBasic(
        32, 32, drop_path=DropPath(0.5)
    ),
    "sknet.SelectiveKernelBottleneck": lambda: sknet.SelectiveKernelBottleneck(
        32, 8, drop_path=DropPath(0.5)
    ),
    "res2net.Bottle2neck": lambda: res2net.Bottle2neck(
        32, 8, norm_layer=nn.BatchNorm2d, drop_path=DropPath(0.5)
    ),
    "resnest.ResNestBottleneck": lambda: resnest.ResNestBottleneck(
        32, 8, radix=2, drop_path=DropPath(0.5)
    ),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_branch_mirrors_the_block_in_train_mode(name: str):
    """Drop-path and drop-block draw the same masks in the block and in its branch."""
    register_timm_if_imported()
    block = randomize_norms(BLOCKS[name]()).train()
    adapter = adapter_for(block)
    assert adapter.is_identity_skip(block)
    x = torch.randn(4, 32, 8, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        out = block(x.clone())
        torch.manual_seed(1)
        summed = x + adapter.branch(block, x.clone())
    post = adapter.post(block)
    expected = post(summed) if post is not None else summed
    assert _relative(expected, out) <= TOLERANCE
