"""Name the architecture an export came from, so that a saved export can be rebuilt without pickle.

A *source spec* is a JSON-able dict: ``{"kind": "torchvision", "arch": ..., "num_classes": ...}``
or ``{"kind": "ode_resnet", ...keyword arguments of ode_resnet}``. Models of other types have
none: they can be exported but not saved with :func:`save_neural_ode`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from resode_lightning.core.models import ODEResNet, PreActBlock, ode_resnet, torchvision_resnet
from resode_lightning.core.stages import MARKER

# (block type, blocks per layer, groups, width per group) of each torchvision ResNet
_TORCHVISION: dict[tuple[str, tuple[int, ...], int, int], str] = {
    ("BasicBlock", (2, 2, 2, 2), 1, 64): "resnet18",
    ("BasicBlock", (3, 4, 6, 3), 1, 64): "resnet34",
    ("Bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("Bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("Bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("Bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
    ("Bottleneck", (3, 4, 23, 3), 1, 128): "wide_resnet101_2",
    ("Bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("Bottleneck", (3, 4, 23, 3), 32, 8): "resnext101_32x8d",
    ("Bottleneck", (3, 4, 23, 3), 64, 4): "resnext101_64x4d",
}


def source_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec rebuilding ``model``'s architecture (random weights), or ``None`` when unknown.

    A spec is returned only when the model it rebuilds has the same modules and tensor shapes
    as ``model`` (a torchvision ResNet with a new stem or pooling has none).
    """
    spec = _describe(model)
    return spec if spec is not None and _rebuilds(spec, model) else None


def _rebuilds(spec: dict[str, Any], model: nn.Module) -> bool:
    with torch.device("meta"):
        rebuilt = build_source(spec)

    def layout(net: nn.Module) -> tuple:
        modules = [(name, type(module)) for name, module in net.named_modules()]
        shapes = [
            (name, tuple(t.shape)) for name, t in net.state_dict().items() if MARKER not in name
        ]
        return modules, shapes

    return layout(rebuilt) == layout(model)


def _describe(model: nn.Module) -> dict[str, Any] | None:
    if isinstance(model, ResNet):
        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        block = type(layers[0][0])
        if block not in (BasicBlock, Bottleneck):
            return None
        key = (
            block.__name__,
            tuple(len(layer) for layer in layers),
            model.groups,
            model.base_width,
        )
        arch = _TORCHVISION.get(key)
        if arch is None or not isinstance(model.fc, nn.Linear):
            return None
        return {"kind": "torchvision", "arch": arch, "num_classes": model.fc.out_features}
    if isinstance(model, ODEResNet):
        first: PreActBlock = model.stages[0][0]
        return {
            "kind": "ode_resnet",
            "depths": [len(stage) for stage in model.stages],
            "widths": [stage[0].conv1.in_channels for stage in model.stages],
            "num_classes": model.fc.out_features,
            "in_channels": model.stem[0].in_channels,
            "stem": "cifar" if model.stem[0].kernel_size == (3, 3) else "imagenet",
            "activation": "gelu" if isinstance(first.act, nn.GELU) else "relu",
            "norm": isinstance(first.bn1, nn.BatchNorm2d),
        }
    return None


def build_source(spec: dict[str, Any]) -> nn.Module:
    """A randomly initialised model of the architecture ``spec`` names, in eval mode.

    Raises:
        ValueError: ``spec`` names no known architecture.
    """
    kind = spec.get("kind")
    if kind == "torchvision":
        return torchvision_resnet(spec["arch"], num_classes=spec["num_classes"]).eval()
    if kind == "ode_resnet":
        kwargs = {key: value for key, value in spec.items() if key != "kind"}
        return ode_resnet(**kwargs, init="iid", seed=0).eval()
    raise ValueError(f"unknown source architecture {spec!r}")
