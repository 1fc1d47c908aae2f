"""What several subcommands share: the model of ``--arch`` from a checkpoint, an output check,
argument types."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from resode_lightning.cli.architecture import FORMS, Architecture, architecture
from resode_lightning.core.io.checkpoint import load_state_dict_file
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.core.models import TORCHVISION_RESNETS, torchvision_resnet
from resode_lightning.core.odeform import strip_prefix
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


def add_architecture(parser: argparse.ArgumentParser, *, inferred: bool) -> None:
    """``--arch`` and ``--arch-kwargs``, the one architecture spec of every subcommand."""
    parser.add_argument(
        "--arch",
        type=architecture,
        required=not inferred,
        help=f"architecture: {FORMS}"
        + (" (default: the torchvision ResNet the checkpoint's keys and shapes fit)" * inferred),
    )
    parser.add_argument(
        "--arch-kwargs",
        type=json_object,
        default={},
        help='JSON keyword arguments of the builder, e.g. \'{"depths": [16], "widths": [16]}\'',
    )


def load_model(
    path: str, arch: Architecture | None, kwargs: Mapping[str, object], *, max_classes: int
) -> tuple[nn.Module, Architecture]:
    """The model that ``arch`` (inferred among torchvision ResNets when ``None``) builds with
    ``kwargs``, loaded from ``path``, in eval mode, and its architecture.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is unreadable, holds NaN or inf, or does not fit ``arch``;
            the message names the file.
        ValueError: the builder refuses ``kwargs``.
    """
    state_dict = load_state_dict_file(path)
    try:
        for key, value in state_dict.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{key!r} holds NaN or inf values")
        if arch is None:
            try:
                arch = architecture(infer_arch(state_dict))
            except ValueError as error:
                raise CheckpointError(str(error)) from None
        return arch.build(kwargs, state_dict, max_classes=max_classes), arch
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


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
    batch = probe_batch(reference, size, seed=0)
    expected = reference.eval()(batch)
    change = (model.eval()(batch) - expected).abs().max()
    scale = expected.abs().max()
    return float(change / scale if scale > 0 else change)


def probe_batch(model: nn.Module, size: int, *, seed: int) -> Tensor:
    """A fixed random batch of two inputs for ``model``: the channels of its first convolution,
    ``size`` pixels a side (and 8 frames for a video model)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels, dims = (3, 2) if conv is None else (conv.in_channels, len(conv.kernel_size))
    shape = (2, channels, *[8] * (dims == 3), *[size] * min(dims, 2))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
