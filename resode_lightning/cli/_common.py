"""What several subcommands share: a torchvision ResNet from a checkpoint, an output check,
argument types."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from resode_lightning.core.files import (
    CheckpointError,
    load_into,
    load_state_dict_file,
    strip_prefix,
)
from resode_lightning.core.models import TORCHVISION_RESNETS, torchvision_resnet
from resode_lightning.core.stages import MARKER

MAX_CLASSES = 100_000
"""Default bound on the number of classes a checkpoint's head may declare (``--max-classes``)."""


def add_max_classes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-classes",
        type=int,
        default=MAX_CLASSES,
        help=f"refuse heads with more classes than this (default {MAX_CLASSES:,})",
    )


def json_object(text: str) -> dict[str, object]:
    """An argparse ``type``: a JSON object (keyword arguments), else a message saying so."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is a JSON {type(value).__name__}, not an object of keyword arguments "
            f"such as '{{\"depths\": [4]}}'"
        )
    return value


def load_torchvision(path: str, arch: str | None, *, max_classes: int) -> tuple[nn.Module, str]:
    """The torchvision ResNet stored in ``path`` and its architecture, in eval mode.

    Args:
        path: a state dict file (see :func:`~resode_lightning.load_state_dict_file`).
        arch: the architecture; inferred from the keys and shapes when ``None``.
        max_classes: the most classes the head may declare.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is unreadable, holds NaN or inf, or does not fit ``arch``;
            the message names the file.
    """
    state_dict = load_state_dict_file(path)
    try:
        for key, value in state_dict.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{key!r} holds NaN or inf values")
        arch = arch or infer_arch(state_dict)
        return torchvision_from_state_dict(state_dict, arch, max_classes=max_classes), arch
    except ValueError as error:  # CheckpointError included
        raise CheckpointError(f"{path}: {error}") from None


def torchvision_from_state_dict(
    state_dict: dict[str, Tensor], arch: str, *, max_classes: int = MAX_CLASSES
) -> nn.Module:
    """A torchvision ``arch`` with the head size and weights of ``state_dict``, in eval mode.

    Raises:
        ValueError: the head is missing or declares more than ``max_classes`` classes
            (checked before the model is built); the keys or shapes do not match
            (:class:`~resode_lightning.CheckpointError`).
    """
    heads = [(k, v) for k, v in state_dict.items() if k.endswith("fc.weight") and v.dim() == 2]
    if not heads:
        raise ValueError(f"the checkpoint has no 'fc.weight' key: it is not a {arch} state dict")
    key, head = heads[0]
    classes = head.shape[0]
    if classes > max_classes:
        raise ValueError(
            f"{key!r} declares {classes:,} classes, more than --max-classes {max_classes:,}; "
            f"pass a larger --max-classes if that is intended"
        )
    model = torchvision_resnet(arch, num_classes=classes)
    return load_into(model, state_dict).eval()


@functools.cache
def skeleton(arch: str) -> nn.Module:
    """``arch`` on the meta device (names and shapes, no memory), built once per process."""
    with torch.device("meta"):
        return torchvision_resnet(arch)


def infer_arch(state_dict: Mapping[str, Tensor]) -> str:
    """The torchvision ResNet whose parameter names and shapes (head aside) match ``state_dict``.

    Raises:
        ValueError: no architecture, or more than one, matches.
    """
    matches = []
    for arch in TORCHVISION_RESNETS:
        model = skeleton(arch)
        expected = _body_shapes(model.state_dict())
        if _body_shapes(strip_prefix(state_dict, model)) == expected:
            matches.append(arch)
    if len(matches) != 1:
        found = "no torchvision ResNet" if not matches else f"several ({', '.join(matches)})"
        raise ValueError(
            f"cannot infer the architecture: {found} matches the checkpoint's keys and shapes; "
            f"pass --arch (one of {', '.join(TORCHVISION_RESNETS)})"
        )
    return matches[0]


def _body_shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if not key.startswith("fc.") and not key.rsplit(".", 1)[-1].startswith(MARKER)
    }


@torch.no_grad()
def output_change(reference: nn.Module, model: nn.Module, size: int = 64) -> float:
    """max |y_model - y_reference| / max |y_reference| on a fixed random batch, in eval mode.

    The absolute change when the reference output is all zeros; NaN when an output is.
    """
    batch = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = reference.eval()(batch)
    change = (model.eval()(batch) - expected).abs().max()
    scale = expected.abs().max()
    return float(change / scale if scale > 0 else change)
