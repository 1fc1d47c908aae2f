"""ODE-form models survive the standard inference transforms (issue 17).

The step ``h`` of an ODE-form branch is an :class:`ODEStep` module in the graph, so FX fusion,
FX and eager post-training quantization, TorchScript and memory-format changes compute the
ODE-form model's function, while state-dict keys stay those of the plain model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.ao.quantization import convert, get_default_qconfig, get_default_qconfig_mapping
from torch.ao.quantization import prepare as prepare_eager
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.fx.experimental.optimization import fuse
from torchvision.models.quantization import resnet50 as quantizable_resnet50

from resode_lightning.core.blocks import fold_batchnorm
from resode_lightning.core.odeform import from_ode_form, refresh_steps, to_ode_form
from resode_lightning.core.parameters import stage_tensors
from resode_lightning.core.stages import find_stages
from resode_lightning.core.step import ODEStep
from resode_lightning.testing import randomize_norms

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]

FUSE_TOLERANCE = 1e-5
INT8_RATIO = 1.5  # ODE form's int8 error at most this times the plain model's


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def inputs(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(tvm.resnet50()).eval()


def test_the_step_is_a_module_around_the_last_layer(resnet50):
    ode = to_ode_form(resnet50)
    step = ode.layer3[1].bn3
    assert isinstance(step, ODEStep) and isinstance(step.layer, nn.BatchNorm2d)
    assert step.step == pytest.approx(1 / 5)  # layer3: 5 identity-skip blocks
    assert not isinstance(ode.layer3[0].bn3, ODEStep)  # the downsampling block is no step
    assert not any(isinstance(m, ODEStep) for m in from_ode_form(ode).modules())


@pytest.mark.parametrize("arch", ["torchvision_resnet50", "timm_resnet50d"])
def test_fx_fusion_of_the_ode_form_computes_the_model(arch, resnet50):
    if arch.startswith("timm"):
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        model = randomize_norms(timm.create_model("resnet50d", pretrained=False)).eval()
    else:
        model = resnet50
    x = inputs(2, 3, 64, 64, seed=1)
    fused = fuse(to_ode_form(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # conv+bn folded
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= FUSE_TOLERANCE


def fx_int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calibration,))
    with torch.no_grad():
        prepared(calibration)
    return convert_fx(prepared)


def test_fx_int8_quantization_of_the_ode_form_is_as_accurate_as_the_plain_model(resnet50):
    calibration, x = inputs(8, 3, 64, 64, seed=2), inputs(4, 3, 64, 64, seed=3)
    with torch.no_grad():
        expected = resnet50(x)
        plain = relative_error(fx_int8(resnet50, calibration)(x), expected)
        ode = relative_error(fx_int8(to_ode_form(resnet50), calibration)(x), expected)
    assert ode <= INT8_RATIO * plain, f"int8 error: ODE form {ode:.3g}, plain {plain:.3g}"


def eager_int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """The standard eager recipe: fuse, qconfig, prepare, calibrate, convert."""
    model = copy.deepcopy(model).eval()
    model.fuse_model()
    model.qconfig = get_default_qconfig("x86")
    prepare_eager(model, inplace=True)
    with torch.no_grad():
        model(calibration)
    return convert(model, inplace=True)


def test_eager_int8_quantization_of_the_ode_form_is_as_accurate_as_the_plain_model():
    torch.manual_seed(0)
    model = randomize_norms(quantizable_resnet50(quantize=False)).eval()
    calibration, x = inputs(8, 3, 64, 64, seed=4), inputs(4, 3, 64, 64, seed=5)
    with torch.no_grad():
        expected = model(x)
        plain = relative_error(eager_int8(model, calibration)(x), expected)
        ode = relative_error(eager_int8(to_ode_form(model), calibration)(x), expected)
    assert ode <= INT8_RATIO * plain, f"int8 error: ODE form {ode:.3g}, plain {plain:.3g}"


def test_torchscript_of_the_ode_form_equals_eager(resnet50):
    ode = to_ode_form(resnet50)
    scripted = torch.jit.script(ode)
    x = inputs(2, 3, 64, 64, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ode(x))


def test_channels_last_ode_form_computes_the_model(resnet50):
    ode = to_ode_form(resnet50).to(memory_format=torch.channels_last)
    x = inputs(2, 3, 64, 64, seed=7)
    with torch.no_grad():
        actual = ode(x.to(memory_format=torch.channels_last))
        assert relative_error(actual, resnet50(x)) <= FUSE_TOLERANCE


def test_state_dict_keys_are_the_plain_models_plus_markers(resnet50):
    ode_keys = list(to_ode_form(resnet50).state_dict())
    markers = [key for key in ode_keys if key.endswith("ode_horizon")]
    assert markers == [f"layer{i}.ode_horizon" for i in range(1, 5)]
    assert [key for key in ode_keys if key not in markers] == list(resnet50.state_dict())


def test_from_ode_form_restores_the_plain_structure_and_keys(resnet50):
    back = from_ode_form(to_ode_form(resnet50))
    structure = [(name, type(module)) for name, module in back.named_modules()]
    assert structure == [(name, type(module)) for name, module in resnet50.named_modules()]
    assert list(back.state_dict()) == list(resnet50.state_dict())
    for name, value in resnet50.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, msg=name)


def test_ode_form_state_dict_loads_strictly_into_a_fresh_ode_form_model(resnet50):
    state = to_ode_form(resnet50).state_dict()
    fresh = to_ode_form(tvm.resnet50()).eval()
    fresh.load_state_dict(state, strict=True)
    x = inputs(2, 3, 64, 64, seed=8)
    with torch.no_grad():
        assert relative_error(fresh(x), resnet50(x)) <= FUSE_TOLERANCE
    del state["layer1.1.bn3.weight"]
    state["layer1.1.bn3.layer.bias"] = state["layer1.1.bn3.bias"]
    result = fresh.load_state_dict(state, strict=False)  # reported as saved, not as nested
    assert result.missing_keys == ["layer1.1.bn3.weight"]
    assert result.unexpected_keys == ["layer1.1.bn3.layer.bias"]


def test_block_parameters_keep_their_plain_names_in_ode_form():
    model = randomize_norms(tvm.resnet18()).eval()
    plain, _ = stage_tensors(find_stages(model)[0])
    ode, factors = stage_tensors(find_stages(to_ode_form(model))[0])
    assert list(ode) == list(plain) and "bn2.weight" in ode
    assert factors == {}  # in ODE form every tensor counts as it is


def test_sync_batchnorm_conversion_keeps_the_step():
    model = randomize_norms(tvm.resnet18()).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(to_ode_form(model)).eval()
    assert isinstance(synced.layer1[1].bn2, ODEStep)
    assert isinstance(synced.layer1[1].bn2.layer, nn.SyncBatchNorm)
    refresh_steps(synced)
    x = inputs(2, 3, 32, 32, seed=9)
    with torch.no_grad():
        assert relative_error(synced(x), model(x)) <= FUSE_TOLERANCE


def test_folding_an_ode_form_block_hands_the_step_to_the_fused_conv():
    model = randomize_norms(tvm.resnet18()).eval()
    block = to_ode_form(model).layer1[1]
    folded = copy.deepcopy(block)
    fold_batchnorm(folded, (("conv1", "bn1"), ("conv2", "bn2")))
    assert isinstance(folded.conv2, ODEStep) and isinstance(folded.bn2, nn.Identity)
    x = inputs(2, 64, 8, 8, seed=10)
    with torch.no_grad():
        assert relative_error(folded(x), model.layer1[1](x)) <= FUSE_TOLERANCE
