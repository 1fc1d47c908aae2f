"""Finding residual stages through block adapters."""

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from resode_lightning import find_stages, ode_resnet, register_block
from resode_lightning.core.registry import registration_scope


def depths(model):
    return {stage.name: stage.depth for stage in find_stages(model)}


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (tvm.resnet18, {"layer1": 2}),
        (tvm.resnet34, {"layer1": 3, "layer2": 3, "layer3": 5, "layer4": 2}),
        (tvm.resnet50, {"layer1": 2, "layer2": 3, "layer3": 5, "layer4": 2}),
        (tvm.resnet101, {"layer1": 2, "layer2": 3, "layer3": 22, "layer4": 2}),
    ],
)
def test_torchvision_stages_skip_downsampling_blocks(builder, expected):
    model = builder()
    assert depths(model) == expected
    stages = find_stages(model)
    assert [s.name for s in stages] == list(expected)  # forward order
    layer1 = stages[0]
    if builder is tvm.resnet50:
        assert layer1.indices == [1, 2]  # block 0 downsamples (64 -> 256 channels)
        assert layer1.blocks[0] is model.layer1[1]


def test_ode_resnet_stages_are_named_by_module_path():
    model = ode_resnet(depths=(3, 4), widths=(8, 16))
    assert depths(model) == {"stages.0": 3, "stages.1": 4}


class TanhBlock(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.tanh(x))


@pytest.fixture
def tanh_block_registered():
    with registration_scope():
        register_block(
            TanhBlock, branch=lambda block, x: block.conv(torch.tanh(x)), last_layer="conv"
        )
        yield


def test_registered_block_runs_split_at_shape_changes(tanh_block_registered):
    model = nn.Sequential(
        TanhBlock(),
        TanhBlock(),
        nn.Conv2d(4, 4, 3, stride=2),
        TanhBlock(),
        TanhBlock(),
        TanhBlock(),
    )
    stages = find_stages(model)
    assert [(s.name, s.indices) for s in stages] == [
        ("Sequential[0:2]", [0, 1]),
        ("Sequential[3:6]", [3, 4, 5]),
    ]
    assert stages[0].marker != stages[1].marker


def test_single_block_is_not_a_stage(tanh_block_registered):
    model = nn.Sequential(TanhBlock(), nn.ReLU(), TanhBlock(), TanhBlock())
    assert [s.indices for s in find_stages(model)] == [[2, 3]]


class _NoSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x))  # no skip: not residual


class BasicBlock(_NoSkip):
    """A class named like torchvision's, in another module."""


def test_model_without_stages_names_what_it_saw_why_and_how_to_register():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), BasicBlock(), BasicBlock())
    with pytest.raises(ValueError) as error:
        find_stages(model)
    message = str(error.value)
    assert "Conv2d" in message and "register_block" in message
    # the two BasicBlock classes are told apart, and why this one is no block is said
    assert "torchvision.models.resnet.BasicBlock" in message
    assert f"{__name__}.BasicBlock: its graph shows no post(x + branch(x))" in message


def test_register_block_validates_its_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_block(int, branch=lambda b, x: x)
    with pytest.raises(TypeError, match="callable"):
        register_block(TanhBlock, branch=None)


def test_stage_step_and_repr():
    stage = find_stages(tvm.resnet50())[2]
    assert stage.step == pytest.approx(1 / 5)
    assert not stage.is_ode_form and stage.horizon is None
    assert "layer3" in repr(stage) and "5 x Bottleneck" in repr(stage)


def test_resampling_a_block_without_settable_step_is_refused(tanh_block_registered_without_last):
    from resode_lightning import resample_depth

    model = nn.Sequential(TanhBlock(), TanhBlock(), TanhBlock(), TanhBlock())
    with pytest.raises(ValueError, match="step cannot be changed"):
        resample_depth(model, 2)


@pytest.fixture
def tanh_block_registered_without_last():
    with registration_scope():
        register_block(TanhBlock, branch=lambda block, x: block.conv(torch.tanh(x)))
        yield
