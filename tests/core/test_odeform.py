"""Lossless ODE-form conversion, its inverse, markers, and depth resampling."""

import copy

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from resode_lightning import (
    find_stages,
    from_ode_form,
    is_ode_form,
    load_into,
    ode_resnet,
    resample_depth,
    to_ode_form,
)
from resode_lightning.core.resample import blocks_at_depth
from resode_lightning.testing import randomize_norms

ARCHS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
]


def relative_error(output, reference):
    return float((output - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_conversion_is_lossless_in_eval_float32(arch):
    model = randomize_norms(tvm.get_model(arch, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        converted = to_ode_form(model)
        assert relative_error(converted(x), reference) <= 1e-5
    assert is_ode_form(converted) and not is_ode_form(model)  # the input model is untouched


@pytest.mark.parametrize("arch", ARCHS)
def test_conversion_is_lossless_in_train_float64(arch):
    model = randomize_norms(tvm.get_model(arch, num_classes=10)).double().train()
    converted = to_ode_form(model)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= 1e-9


def test_state_dict_keys_kept_plus_one_marker_per_stage():
    model = tvm.resnet50()
    converted = to_ode_form(model, horizon=2.0)
    added = set(converted.state_dict()) - set(model.state_dict())
    assert added == {f"layer{i}.ode_horizon" for i in range(1, 5)}
    assert set(model.state_dict()) <= set(converted.state_dict())
    assert float(converted.state_dict()["layer3.ode_horizon"]) == 2.0


def test_last_affine_layer_is_multiplied_by_depth_over_horizon():
    model = randomize_norms(tvm.resnet50())
    converted = to_ode_form(model, horizon=2.0)
    # layer3 has 5 identity blocks: factor L / horizon = 2.5; block 0 (downsampling) untouched;
    # the rescaled layer sits in the ODEStep that multiplies its output by the step
    bn3 = converted.layer3[1].bn3.layer
    torch.testing.assert_close(bn3.weight, model.layer3[1].bn3.weight * 2.5)
    torch.testing.assert_close(bn3.bias, model.layer3[1].bn3.bias * 2.5)
    torch.testing.assert_close(converted.layer3[1].bn2.weight, model.layer3[1].bn2.weight)
    torch.testing.assert_close(converted.layer3[0].bn3.weight, model.layer3[0].bn3.weight)


def test_converted_block_is_a_projected_euler_step_by_hand():
    model = randomize_norms(tvm.resnet18()).eval()
    converted = to_ode_form(model, horizon=3.0).eval()
    block = converted.layer1[1]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        hidden = torch.relu(block.bn1(block.conv1(x)))
        bn2 = block.bn2.layer  # the BatchNorm, in the ODEStep holding the step
        z = block.conv2(hidden)
        field = (z - bn2.running_mean[:, None, None]) / torch.sqrt(
            bn2.running_var[:, None, None] + bn2.eps
        )
        field = field * bn2.weight[:, None, None] + bn2.bias[:, None, None]  # F at ODE-form scale
        step = 3.0 / 2
        torch.testing.assert_close(block(x), torch.relu(x + step * field), rtol=1e-5, atol=1e-5)


def test_conversion_is_idempotent_and_round_trips():
    model = randomize_norms(tvm.resnet34())
    once = to_ode_form(model)
    twice = to_ode_form(once, horizon=5.0)  # already converted: no-op, horizon kept
    for (name, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.equal(a, b), name
    back = from_ode_form(once)
    assert not is_ode_form(back)
    assert set(back.state_dict()) == set(model.state_dict())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=1e-6, atol=0, msg=name)


def test_strict_load_into_plain_model_fails_loudly():
    converted = to_ode_form(tvm.resnet18())
    with pytest.raises(RuntimeError, match="ode_horizon"):
        tvm.resnet18().load_state_dict(converted.state_dict())


def test_package_loader_reads_markers_and_converts():
    model = randomize_norms(tvm.resnet50()).eval()
    converted = to_ode_form(model, horizon=0.5)
    fresh = load_into(tvm.resnet50(), converted.state_dict()).eval()
    assert is_ode_form(fresh) and find_stages(fresh)[0].horizon == 0.5
    assert is_ode_form(to_ode_form(fresh))  # idempotent after a save/load round trip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fresh(x), model(x)) <= 1e-5
        # and a plain state dict into an ODE-form model returns it to the plain form
        plain = load_into(to_ode_form(tvm.resnet50()), model.state_dict()).eval()
        assert not is_ode_form(plain)
        assert relative_error(plain(x), model(x)) == 0


def without_affine(model: nn.Module) -> nn.Module:
    """BatchNorm2d(affine=False) everywhere (torchvision's builder cannot initialise it)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.affine = False
            module.register_parameter("weight", None)
            module.register_parameter("bias", None)
    return model


@pytest.mark.parametrize(
    "norm_layer",
    [FrozenBatchNorm2d, "affine_false", nn.Identity],
    ids=["frozen_bn", "bn_affine_false", "no_norm"],
)
def test_norm_variants_convert_losslessly(norm_layer):
    if norm_layer == "affine_false":
        model = without_affine(tvm.resnet18())
    else:
        model = tvm.resnet18(norm_layer=norm_layer)
    model = randomize_norms(model).eval()
    if norm_layer is nn.Identity:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.mul_(0.5)
    x = torch.randn(2, 3, 64, 64)
    converted = to_ode_form(model, horizon=3.0)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) <= 1e-5
    if norm_layer is FrozenBatchNorm2d:  # its affine weight and bias are buffers
        torch.testing.assert_close(
            converted.layer1[1].bn2.layer.weight, model.layer1[1].bn2.weight * 2 / 3
        )
    elif norm_layer is nn.Identity:  # the last conv carries the factor
        torch.testing.assert_close(
            converted.layer1[1].conv2.layer.weight, model.layer1[1].conv2.weight * 2 / 3
        )
    else:  # nothing to rescale: the weights are unchanged
        for name, value in model.state_dict().items():
            assert torch.equal(converted.state_dict()[name], value), name


def test_horizon_must_be_positive():
    with pytest.raises(ValueError, match="horizon"):
        to_ode_form(tvm.resnet18(), horizon=0)


def test_resample_at_same_depth_is_identity():
    model = randomize_norms(tvm.resnet50()).eval()
    resampled = resample_depth(model, {"layer3": 5, "layer2": 3})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(resampled(x), model(x)) <= 1e-5


def test_resample_interpolates_linearly_in_depth_by_hand():
    model = ode_resnet(depths=(4,), widths=(8,), init="smooth", seed=0)
    stage = find_stages(model)[0]
    old = [block.conv1.weight.detach().clone() for block in stage.blocks]
    resampled = resample_depth(model, 8)
    new_stage = find_stages(resampled)[0]
    assert new_stage.depth == 8 and len(resampled.stages[0]) == 8
    new = [block.conv1.weight for block in new_stage.blocks]
    # block j sits at t = j / 8; old block k at k / 4; constant after the last block
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[1], 0.5 * (old[0] + old[1]))
    torch.testing.assert_close(new[6], old[3])
    torch.testing.assert_close(new[7], old[3])
    assert all(block.step == pytest.approx(1 / 8) for block in new_stage.blocks)


def test_resample_half_steps_of_a_torchvision_stage_uses_step_horizon_over_steps():
    model = randomize_norms(tvm.resnet50()).eval()
    resampled = resample_depth(model, {"layer3": 2}).eval()
    assert [s.depth for s in find_stages(resampled)] == [2, 3, 2, 2]
    assert len(resampled.layer3) == 3  # downsampling block kept
    stage = find_stages(model)[2]
    blocks = blocks_at_depth(find_stages(to_ode_form(model))[2], 2)
    # hand reference: block j uses the path at t = j / 2, i.e. old blocks 0 and 2.5
    x = torch.randn(2, 1024, 4, 4)
    with torch.no_grad():
        assert blocks[0].bn3.step == 0.5
        ode = to_ode_form(model)
        ode_stage = find_stages(ode)[2]
        mid = copy.deepcopy(ode_stage.blocks[2])
        for value, a, b in zip(
            mid.state_dict().values(),
            ode_stage.blocks[2].state_dict().values(),
            ode_stage.blocks[3].state_dict().values(),
        ):
            if value.is_floating_point():
                value.copy_(0.5 * (a + b))
        y = x
        for block in (ode_stage.blocks[0], mid):
            block.bn3.step = 0.5
            y = block(y)
        torch.testing.assert_close(resampled.layer3[2](resampled.layer3[1](x)), y)
    assert stage.depth == 5


def test_resample_rejects_unknown_stage_names():
    with pytest.raises(ValueError, match="unknown stage"):
        resample_depth(tvm.resnet18(), {"layer9": 2})
