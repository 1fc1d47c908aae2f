"""Registrations that cannot silently be wrong: each mistake is refused by name, or harmless."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from helpers.runif import RunIf
from torch import nn

from resode_lightning import (
    BlockAdapterError,
    export_neural_ode,
    find_stages,
    register_block,
    registered_blocks,
    registration_scope,
    resample_depth,
    smoothness_report,
    to_ode_form,
)
from resode_lightning.testing import randomize_norms


class SEBlock(nn.Module):
    """x + gate(bn(conv(x))): an attention gate follows the last norm."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Conv2d(width, width, 1)

    def gated(self, x):
        out = self.bn(self.conv(x))
        return out * torch.sigmoid(self.fc(out.mean((2, 3), keepdim=True)))

    def forward(self, x):
        return x + self.gated(x)


class StdConv(nn.Conv2d):
    """A weight-standardised conv, as timm's StdConv2d: its output ignores the weight's scale."""

    def forward(self, x):
        weight = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        weight = weight / (weight.std((1, 2, 3), keepdim=True) + 1e-6)
        return F.conv2d(x, weight, self.bias, padding=self.padding)


class StdConvBlock(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = StdConv(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.tanh(x))


class BatchNormReLU(nn.BatchNorm2d):
    """A fused norm + activation layer, as timm's BatchNormAct2d."""

    def forward(self, x):
        return F.relu(super().forward(x))


class FusedBlock(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = BatchNormReLU(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def branch(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    def forward(self, x):
        return x + self.branch(x)


class PostBlock(nn.Module):
    """relu(x + F(x)), a post-activation block."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.bn(self.conv(x)))


def _relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _net(block_type, depth=4):
    return randomize_norms(nn.Sequential(*[block_type() for _ in range(depth)])).eval()


@pytest.fixture(autouse=True)
def scope():
    with registration_scope():
        yield


def test_gate_after_last_layer_is_refused_with_its_cause():
    register_block(SEBlock, branch=lambda b, x: b.gated(x), last_layer="bn")
    with pytest.raises(BlockAdapterError) as error:
        find_stages(_net(SEBlock))
    message = str(error.value)
    assert "test_registration.SEBlock" in message
    assert "scaling last_layer" in message and "attention gate" in message
    assert "last_layer=None" in message


def test_gate_registered_without_last_layer_exports_exactly():
    register_block(SEBlock, branch=lambda b, x: b.gated(x))
    model, x = _net(SEBlock), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert _relative(to_ode_form(model)(x), model(x)) < 1e-6
        assert _relative(export_neural_ode(model)(x), model(x)) < 1e-6


def test_weight_standardised_last_layer_is_refused():
    register_block(StdConvBlock, branch=lambda b, x: b.conv(torch.tanh(x)), last_layer="conv")
    with pytest.raises(BlockAdapterError, match="StdConv.*weight standardisation.*last_layer=None"):
        find_stages(_net(StdConvBlock))


def test_fused_norm_act_in_conv_bn_pairs_is_harmless():
    register_block(
        FusedBlock,
        branch=lambda b, x: b.branch(x),
        last_layer="bn2",
        conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2")),
    )
    model, x = _net(FusedBlock), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert _relative(export_neural_ode(model)(x), model(x)) < 1e-6


def test_pair_whose_norm_does_not_follow_its_conv_is_refused():
    register_block(
        FusedBlock,
        branch=lambda b, x: b.branch(x),
        last_layer="bn2",
        conv_bn_pairs=(("conv1", "bn2"),),
    )
    with pytest.raises(BlockAdapterError, match="folding conv_bn_pairs"):
        find_stages(_net(FusedBlock))


def test_forgotten_post_is_refused_and_named():
    register_block(PostBlock, branch=lambda b, x: b.bn(b.conv(x)), last_layer="bn")
    with pytest.raises(BlockAdapterError, match="PostBlock.*activation after the sum.*post="):
        find_stages(_net(PostBlock))


def test_post_read_from_the_block_exports_exactly():
    register_block(PostBlock, branch=lambda b, x: b.bn(b.conv(x)), last_layer="bn", post="act")
    model, x = _net(PostBlock), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert _relative(export_neural_ode(model)(x), model(x)) < 1e-6
    assert find_stages(model)[0].post is model[0].act


def test_example_block_is_checked_at_registration():
    with pytest.raises(BlockAdapterError, match="PostBlock"):
        register_block(PostBlock, branch=lambda b, x: b.bn(b.conv(x)), example=PostBlock())
    assert PostBlock not in registered_blocks()


def test_registering_over_an_adapter_warns_and_scopes_restore_the_table():
    from torchvision.models.resnet import BasicBlock

    before = registered_blocks()[BasicBlock]
    with (
        registration_scope(),
        pytest.warns(UserWarning, match="replacing the adapter of .*BasicBlock"),
    ):
        register_block(BasicBlock, branch=lambda b, x: x)
    assert registered_blocks()[BasicBlock] is before


def test_pruned_stage_is_split_where_shapes_change():
    register_block(PostBlock, branch=lambda b, x: b.bn(b.conv(x)), last_layer="bn", post="act")
    blocks = [PostBlock() for _ in range(5)]
    blocks[2].conv = nn.Conv2d(4, 4, 1, bias=False)  # another kernel: other parameter shapes
    model = randomize_norms(nn.Sequential(*blocks)).eval()
    stages = find_stages(model)
    assert [(s.indices[0], s.depth) for s in stages] == [(0, 2), (3, 2)]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert _relative(export_neural_ode(model)(x), model(x)) < 1e-6
    assert len(smoothness_report(model)) == 2


def test_stages_in_named_children_resample_with_their_naming():
    register_block(PostBlock, branch=lambda b, x: b.bn(b.conv(x)), last_layer="bn", post="act")
    stage = nn.Sequential(OrderedDict((f"block1-{i}", PostBlock()) for i in range(4)))
    model = randomize_norms(nn.Sequential(OrderedDict(trunk=stage))).eval()
    x = torch.randn(2, 4, 8, 8)
    same = resample_depth(model, 4)
    with torch.no_grad():
        assert _relative(same(x), model(x)) < 1e-6
    deeper = resample_depth(model, 6)
    keys = [k for k in deeper.state_dict() if k.endswith("conv.weight")]
    assert keys == [f"trunk.block1-{i}.conv.weight" for i in range(6)]
    assert find_stages(deeper)[0].depth == 6


class Holder(nn.Module):
    """Blocks held as attributes of a plain module, as timm's RegStage holds b1, b2, ..."""

    def __init__(self) -> None:
        super().__init__()
        for i in range(1, 4):
            self.add_module(f"b{i}", PostBlock())

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


def test_stages_in_any_container():
    register_block(PostBlock, branch=lambda b, x: b.bn(b.conv(x)), last_layer="bn", post="act")
    model = randomize_norms(nn.Sequential(Holder())).eval()
    (stage,) = find_stages(model)
    assert (stage.name, stage.depth) == ("0", 3)
    resampled = resample_depth(model, 5)
    assert list(resampled[0]._modules) == [f"b{i}" for i in range(1, 6)]


def test_deep_stage_exports_to_float32_rounding():
    from torchvision.models import resnet152

    model = randomize_norms(resnet152(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _relative(export_neural_ode(model)(x), model(x)) <= 1e-5


@RunIf(timm=True)
def test_timm_adapters_first_met_inside_a_scope_stay_registered():
    import subprocess
    import sys

    code = (
        "import timm\n"
        "from resode_lightning import find_stages, registered_blocks, registration_scope\n"
        "from timm.models.resnet import BasicBlock\n"
        "with registration_scope():\n"
        "    find_stages(timm.create_model('resnet18', num_classes=2))\n"
        "assert BasicBlock in registered_blocks()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class TimmLayersBlock(nn.Module):
    """x + conv2(bn_act(conv1(x))) with timm's fused BatchNormAct2d and a StdConv2d at the end."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d, StdConv2d

        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(width, act_layer=nn.ReLU)
        self.conv2 = StdConv2d(width, width, 3, padding=1)

    def branch(self, x):
        return self.conv2(self.bn1(self.conv1(x)))

    def forward(self, x):
        return x + self.branch(x)


@RunIf(timm=True)
def test_timm_fused_norm_act_pair_folds_exactly_and_std_conv_last_layer_is_refused():
    register_block(
        TimmLayersBlock, branch=lambda b, x: b.branch(x), conv_bn_pairs=(("conv1", "bn1"),)
    )
    model, x = _net(TimmLayersBlock), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert _relative(export_neural_ode(model)(x), model(x)) < 1e-5
    with (
        registration_scope(),
        pytest.warns(UserWarning, match="replacing"),
        pytest.raises(BlockAdapterError, match="StdConv2d.*last_layer=None"),
    ):
        register_block(
            TimmLayersBlock,
            branch=lambda b, x: b.branch(x),
            last_layer="conv2",
            example=TimmLayersBlock(),
        )
