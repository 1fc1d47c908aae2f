"""Name and fingerprint the architecture an export came from, so that a saved export reloads.

A *source spec* is a JSON-able dict. Its ``kind`` says how the architecture is rebuilt:
``"torchvision"`` (with ``arch`` and ``num_classes``) and ``"ode_resnet"`` (with the keyword
arguments of :func:`~resode_lightning.ode_resnet`) are built by the package; ``"custom"`` is any
other model, rebuilt from a skeleton the user passes. Every spec also holds ``class`` (the
model's qualified class name, a string that is never imported), ``fingerprint`` (module types
and tensor shapes by name, against which a skeleton is checked) and ``horizons`` (the ODE-form
marker of each stage in ODE form).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from resode_lightning.core.blocks import qualified_name
from resode_lightning.core.models import (
    LIMITS,
    ODEResNet,
    PreActBlock,
    check_ode_resnet_arguments,
    ode_resnet,
    torchvision_resnet,
)
from resode_lightning.core.stages import MARKER
from resode_lightning.core.step import named_modules_by_key

BUILT_KINDS = ("torchvision", "ode_resnet")
"""Kinds of source the package builds itself; others need a skeleton to load."""

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

_ODE_RESNET_ARGUMENTS = (
    "depths",
    "widths",
    "num_classes",
    "in_channels",
    "stem",
    "activation",
    "norm",
)


def source_spec(model: nn.Module) -> dict[str, Any]:
    """The spec of ``model``'s architecture (see the module docstring).

    The kind is ``"torchvision"`` or ``"ode_resnet"`` only when the model the package builds
    for it has the same modules and tensor shapes as ``model`` (a torchvision ResNet with a
    new stem or pooling is ``"custom"``).
    """
    structure = fingerprint(model)
    spec = _describe(model)
    if spec is None or fingerprint(_build(spec, device="meta")) != structure:
        spec = {"kind": "custom"}
    return {
        **spec,
        "class": qualified_name(type(model)),
        "fingerprint": structure,
        "horizons": {
            key: float(value) for key, value in model.state_dict().items() if _is_marker(key)
        },
    }


def fingerprint(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The structure of ``model``: module types and tensor shapes by name.

    ODE-form markers are left out: the form is not the architecture.
    """
    return {
        "modules": {
            name: qualified_name(type(module)) for name, module in named_modules_by_key(model)
        },
        "tensors": {
            key: list(value.shape)
            for key, value in model.state_dict().items()
            if not _is_marker(key)
        },
    }


def fingerprint_differences(source: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """What differs between a source's fingerprint and a model's, a line per kind (none: equal)."""
    lines = []
    for part, what in (("modules", "type"), ("tensors", "shape")):
        want, got = source[part], model[part]
        missing = [name for name in want if name not in got]
        unexpected = [name for name in got if name not in want]
        changed = [
            f"{name or '<root>'} {want[name]} -> {got[name]}"
            for name in want
            if name in got and want[name] != got[name]
        ]
        if missing:
            lines.append(
                f"{len(missing)} {part} of the source missing from model= {_head(missing)}"
            )
        if unexpected:
            lines.append(
                f"{len(unexpected)} {part} of model= not in the source {_head(unexpected)}"
            )
        if changed:
            lines.append(f"{len(changed)} {part} of another {what} in model= {_head(changed)}")
    return lines


def _head(items: list[str], count: int = 5) -> str:
    return "[" + ", ".join(items[:count]) + (", ...]" if len(items) > count else "]")


def _is_marker(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(MARKER)


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


def check_source_spec(spec: object) -> None:
    """Raise ``ValueError`` naming the field unless ``spec`` is a well-formed source spec within
    :data:`LIMITS` (a spec read from a file is hostile until checked)."""
    if not isinstance(spec, dict):
        raise ValueError(f"source must be a JSON object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in (*BUILT_KINDS, "custom"):
        raise ValueError(f"source.kind must be one of {(*BUILT_KINDS, 'custom')}, got {kind!r}")
    if not isinstance(spec.get("class"), str):
        raise ValueError("source.class must be a string")
    prints = spec.get("fingerprint")
    if not (
        isinstance(prints, dict)
        and set(prints) == {"modules", "tensors"}
        and _is_map(prints["modules"], lambda v: isinstance(v, str))
        and _is_map(prints["tensors"], lambda v: isinstance(v, list) and all(_count(d) for d in v))
    ):
        raise ValueError("source.fingerprint must map modules to type names and tensors to shapes")
    horizons = spec.get("horizons")
    if not _is_map(horizons, lambda v: _number(v) and 0 < v < math.inf):
        raise ValueError("source.horizons must map marker names to finite positive numbers")
    if kind == "torchvision":
        if spec.get("arch") not in _TORCHVISION.values():
            raise ValueError(f"source.arch {spec.get('arch')!r} is not a torchvision ResNet")
        _check_count(spec, "num_classes", LIMITS["num_classes"])
    elif kind == "ode_resnet":
        check_ode_resnet_arguments(spec, field="source.")


def _check_count(spec: dict[str, Any], name: str, limit: int) -> None:
    if not _count(spec.get(name), limit):
        raise ValueError(f"source.{name} must be an int in [1, {limit:,}], got {spec.get(name)!r}")


def _count(value: object, limit: int = 2**31) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_map(value: object, valid: Callable[[object], bool]) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and valid(item) for key, item in value.items()
    )


def build_source(spec: dict[str, Any]) -> nn.Module:
    """A randomly initialised model of the architecture ``spec`` names, in eval mode.

    Raises:
        ValueError: ``spec`` is not of a kind the package builds (``BUILT_KINDS``).
    """
    return _build(spec, device="cpu")


def _build(spec: dict[str, Any], device: str) -> nn.Module:
    kind = spec.get("kind")
    with torch.device(device):
        if kind == "torchvision":
            return torchvision_resnet(spec["arch"], num_classes=spec["num_classes"]).eval()
        if kind == "ode_resnet":
            kwargs = {name: spec[name] for name in _ODE_RESNET_ARGUMENTS}
            return ode_resnet(**kwargs, init="iid", seed=0).eval()
    raise ValueError(f"the package builds sources of kind {BUILT_KINDS}, not {kind!r}")
