"""Residual blocks nobody registered: adapters read from their torch.fx graph (issue 18)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from resode_lightning import (
    export_neural_ode,
    find_stages,
    register_block,
    registration_scope,
    to_ode_form,
)
from resode_lightning.core.adapters.inferred import INFERRED
from resode_lightning.testing import randomize_norms


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# ------------------------------------------------ blocks in the styles of research code


class LambdaLayer(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class OptionABlock(nn.Module):
    """The classic CIFAR ResNet block: option-A (padding) shortcut when it downsamples."""

    def __init__(self, inputs: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != width:
            pad = (width - inputs) // 2
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


def resnet56() -> nn.Module:
    layers, inputs = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for k in range(9):
            layers.append(OptionABlock(inputs, width, stride if k == 0 else 1))
            inputs = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class PreActivationBlock(nn.Module):
    """He et al.'s pre-activation block: nothing after the sum."""

    def __init__(self, width: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class BottleneckTransform(nn.Module):
    def __init__(self, width: int, squeeze: bool):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=2, bias=False))
        self.se = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width, 1), nn.Sigmoid())
            if squeeze
            else None
        )
        self.c = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu(self.b(x))
        if self.se is not None:
            x = x * self.se(x)
        return self.c(x)


class AnyNetBlock(nn.Module):
    """pycls style: the branch is ``self.f``, the activation ``self.af``; optional projection."""

    def __init__(self, width: int, squeeze: bool = False):
        super().__init__()
        self.proj = None
        self.f = BottleneckTransform(width, squeeze)
        self.af = nn.ReLU(inplace=True)

    def forward(self, x):
        x_p = self.proj(x) if self.proj is not None else x
        return self.af(x_p + self.f(x))


class RegNetXBlock(nn.Module):
    """A RegNet-X block whose squeeze-excitation is optional (on for RegNet-Y)."""

    def __init__(self, width: int, squeeze: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.se = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width, 1), nn.Sigmoid())
            if squeeze
            else nn.Identity()
        )
        self.conv3 = nn.Conv2d(width, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = out * self.se(out) if not isinstance(self.se, nn.Identity) else out
        return F.relu(x + self.bn3(self.conv3(out)))


def _net(blocks: list[nn.Module], width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), *blocks, nn.Flatten(), nn.LazyLinear(3))


STYLES = {
    "option-A ResNet-56": lambda: resnet56(),
    "pre-activation": lambda: _net([PreActivationBlock(8) for _ in range(4)], 8),
    "pycls AnyNet": lambda: _net([AnyNetBlock(8) for _ in range(3)], 8),
    "RegNet-X": lambda: _net([RegNetXBlock(8, squeeze=False) for _ in range(3)], 8),
    "RegNet-Y (SE)": lambda: _net([RegNetXBlock(8, squeeze=True) for _ in range(3)], 8),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_blocks_of_research_code_convert_and_export_with_no_registration(style):
    torch.manual_seed(0)
    model = STYLES[style]()
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialise lazy layers
    model = randomize_norms(model.eval())
    stages = find_stages(model)
    assert stages and all(stage.adapter is INFERRED for stage in stages)
    with torch.no_grad():
        expected = model(x)
        assert relative(to_ode_form(model)(x), expected) <= 1e-5
        assert relative(export_neural_ode(model)(x), expected) <= 1e-5
        assert relative(export_neural_ode(model, fold_bn=False)(x), expected) <= 1e-5


def test_the_inferred_structure_names_the_last_layer_and_the_pairs_to_fold():
    block = RegNetXBlock(8, squeeze=False).eval()
    assert INFERRED.last_layer(block) is block.bn3
    assert INFERRED.conv_bn_pairs(block) == (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    assert INFERRED.post(PreActivationBlock(4)) is None


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: torchvision.models.video.r3d_18(), (1, 3, 4, 16, 16)),
        (lambda: torchvision.models.quantization.resnet50(quantize=False), (1, 3, 32, 32)),
    ],
)
def test_torchvision_video_and_quantizable_resnets_out_of_the_box(build, shape):
    model = randomize_norms(build().eval())
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        assert relative(export_neural_ode(model)(x), expected) <= 1e-5


def test_timm_nf_resnet_blocks_with_their_own_beta_export_exactly():
    """Each NF block reads a Python float beta of its own: the export carries it per step."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("nf_resnet50", num_classes=10).eval().double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gain"):  # timm zero-initialises the last gain: make branches count
                parameter.uniform_(0.5, 1.5)
    betas = [block.beta for block in find_stages(model)[1].blocks]
    assert len(set(betas)) == len(betas)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert relative(export_neural_ode(model)(x), model(x)) <= 1e-12


class Tree(nn.Module):
    """A DLA-style tree: both children's outputs go to the root; no chain."""

    def __init__(self, width: int):
        super().__init__()
        self.left = PreActivationBlock(width)
        self.right = PreActivationBlock(width)
        self.root = nn.Conv2d(2 * width, width, 1)

    def forward(self, x):
        left = self.left(x)
        right = self.right(left)
        return self.root(torch.cat([left, right], 1))


def test_a_tree_is_never_a_stage_even_with_its_blocks_registered():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Tree(4), Tree(4))
    with pytest.raises(ValueError, match="No residual stage"):
        find_stages(model)
    with registration_scope():
        register_block(PreActivationBlock, branch=lambda b, x: b(x) - x)
        with pytest.raises(ValueError, match="No residual stage"):
            find_stages(model)


def test_a_block_whose_inferred_structure_fails_the_probe_is_no_block():
    class Doubling(nn.Module):  # x + branch, then a map with state: the post is no activation
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return (x + self.conv(x)) * self.scale

    model = nn.Sequential(Doubling(), Doubling())
    with pytest.raises(ValueError, match="its graph shows no post"):
        find_stages(model)
