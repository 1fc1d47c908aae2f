"""Exports of any architecture: save, load from a skeleton, refusals, the Lightning callback."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from pytorch_lightning import Trainer
from torch import nn

from resode_lightning import (
    CheckpointError,
    NeuralODEExport,
    export_neural_ode,
    load_neural_ode,
    ode_resnet,
    register_block,
    registration_scope,
    save_neural_ode,
    to_ode_form,
)


class TinyBlock(nn.Module):
    """``x + conv2(tanh(conv1(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.tanh(self.conv1(x)))


class UnscaledBlock(TinyBlock):
    """The same block registered without a last layer: its field scales with the horizon."""


class TinyNet(nn.Module):
    """A stem, one stage of residual blocks and a linear head, on 8x8 images."""

    def __init__(
        self,
        width: int = 4,
        depth: int = 3,
        classes: int = 3,
        block: type[nn.Module] = TinyBlock,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.act = activation()
        self.blocks = nn.Sequential(*[block(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.act(self.stem(x))).mean((2, 3)))


def _branch(block: TinyBlock, x: torch.Tensor) -> torch.Tensor:
    return block.conv2(torch.tanh(block.conv1(x)))


@pytest.fixture(autouse=True)
def _registered():
    with registration_scope():
        register_block(TinyBlock, branch=_branch, last_layer="conv2")
        register_block(UnscaledBlock, branch=_branch, last_layer=None)
        yield


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture
def saved(tmp_path):
    model = TinyNet().eval()
    exported = export_neural_ode(model, method="rk4")
    return save_neural_ode(exported, tmp_path / "tiny.pt"), exported, model


def test_custom_export_round_trip_with_a_skeleton(saved):
    path, exported, _ = saved
    loaded = load_neural_ode(path, model=TinyNet())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert max_error(loaded(x), exported(x)) <= 1e-6
    assert all(p.requires_grad for p in loaded.parameters())


def test_the_file_never_pickles_and_names_the_class(saved):
    path, _, _ = saved
    content = torch.load(path, weights_only=True)
    assert set(content) == {"config", "state_dict"}
    source = json.loads(content["config"])["source"]
    assert source["kind"] == "custom"
    assert source["class"] == f"{__name__}.TinyNet"
    assert source["fingerprint"]["tensors"]["blocks.2.conv2.weight"] == [4, 4, 3, 3]


def test_loading_a_custom_export_without_a_skeleton_says_what_to_pass(saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError) as caught:
        load_neural_ode(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"made from {__name__}.TinyNet; pass model=<a fresh {__name__}.TinyNet(...)>" in message


def test_the_class_named_in_the_file_is_never_imported(saved, tmp_path):
    path, _, _ = saved
    content = torch.load(path, weights_only=True)
    config = json.loads(content["config"])
    config["source"]["class"] = "resode_never_imported_module.Evil"
    torch.save({**content, "config": json.dumps(config)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="resode_never_imported_module.Evil"):
        load_neural_ode(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="exported from resode_never_imported_module.Evil"):
        load_neural_ode(tmp_path / "evil.pt", model=TinyNet())
    assert "resode_never_imported_module" not in sys.modules


@pytest.mark.parametrize(
    ("skeleton", "difference"),
    [
        (lambda: TinyNet(depth=4), r"3 modules of model= not in the source \[blocks.3, "),
        (
            lambda: TinyNet(width=8),
            r"tensors of another shape in model= \[blocks.0.conv1.bias \[4\] -> \[8\]",
        ),
        (
            lambda: TinyNet(activation=nn.GELU),
            r"1 modules of another type in model= \[act torch.nn.modules.activation.ReLU -> ",
        ),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), r"but model= is a torch.nn"),
        (lambda: ode_resnet(depths=(3,), widths=(4,)), r"pass model=<a fresh .*TinyNet"),
    ],
)
def test_a_skeleton_of_another_architecture_is_refused(saved, skeleton, difference):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match=difference) as caught:
        load_neural_ode(path, model=skeleton())
    assert str(path) in str(caught.value)


def test_a_skeleton_is_checked_for_built_sources_too(tmp_path):
    model = ode_resnet(depths=(3,), widths=(4,), num_classes=3, seed=0).eval()
    path = save_neural_ode(export_neural_ode(model), tmp_path / "ode.pt")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = load_neural_ode(path)(x)
        fresh = ode_resnet(depths=(3,), widths=(4,), num_classes=3, seed=1)
        assert torch.equal(load_neural_ode(path, model=fresh)(x), expected)
    with pytest.raises(CheckpointError, match="6 modules of the source missing from model="):
        load_neural_ode(path, model=ode_resnet(depths=(2,), widths=(4,), num_classes=3))


def test_an_ode_form_source_keeps_its_horizon(tmp_path):
    """A branch without a last layer is scaled by ``L / horizon`` in the field, not the weights."""
    model = to_ode_form(TinyNet(block=UnscaledBlock).eval(), horizon=2.0)
    exported = export_neural_ode(model)
    path = save_neural_ode(exported, tmp_path / "ode_form.pt")
    loaded = load_neural_ode(path, model=TinyNet(block=UnscaledBlock))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert max_error(exported(x), model(x)) <= 1e-5
        assert max_error(loaded(x), exported(x)) <= 1e-6


def test_a_float64_export_loads_in_float64(tmp_path):
    exported = export_neural_ode(TinyNet().double().eval())
    path = save_neural_ode(exported, tmp_path / "double.pt")
    loaded = load_neural_ode(path, model=TinyNet())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))


class CountedModule(NestedBackboneModule):
    """The backbone at ``net.backbone``, an unused ``head``, and a count of training steps."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.head = nn.Linear(2, 2)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def _trainer(callback: NeuralODEExport) -> Trainer:
    return quiet_trainer(max_steps=2, callbacks=[callback])


def test_callback_saves_a_custom_network_that_loads_from_a_skeleton(tmp_path):
    module = CountedModule(TinyNet(classes=10))
    path = tmp_path / "out" / "tiny_ode.pt"
    callback = NeuralODEExport(path, method="rk4")
    _trainer(callback).fit(module, loader(count=8, size=8))
    assert module.steps == 2
    assert callback.network_name == "net.backbone"
    loaded = load_neural_ode(path, model=TinyNet(classes=10))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = export_neural_ode(module.net["backbone"], method="rk4")(x)
        assert max_error(loaded(x), expected) <= 1e-6


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"submodule": "nope"}, "has no submodule 'nope'"),
        ({"submodule": "head"}, "cannot export submodule 'head' .*No residual stage"),
        ({"knots": 5}, "cannot export submodule 'net.backbone' .*knots=5 exceeds the depth 3"),
    ],
)
def test_callback_refuses_at_setup_before_any_training_step(tmp_path, options, error):
    module = CountedModule(TinyNet(classes=10))
    before = {key: value.clone() for key, value in module.state_dict().items()}
    with pytest.raises(ValueError, match=error):
        _trainer(NeuralODEExport(tmp_path / "x.pt", **options)).fit(module, loader(size=8))
    assert module.steps == 0
    assert all(torch.equal(value, before[key]) for key, value in module.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_callback_without_a_network_refuses_at_setup(tmp_path):
    module = CountedModule(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    )
    with pytest.raises(ValueError, match="no submodule of CountedModule holds residual stages"):
        _trainer(NeuralODEExport(tmp_path / "x.pt")).fit(module, loader(size=8))
    assert module.steps == 0
