"""Print the per-stage smoothness-in-depth table of a torchvision ResNet checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from resode_lightning.cli._common import torchvision_from_state_dict
from resode_lightning.core.io import load_state_dict_file, strip_prefix
from resode_lightning.core.models import TORCHVISION_RESNETS, torchvision_resnet
from resode_lightning.core.smoothness import METRICS, smoothness_report
from resode_lightning.core.stages import MARKER

HELP = "print the per-stage weight smoothness of a ResNet checkpoint (.pth/.ckpt)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="state dict (.pth, Lightning .ckpt, .safetensors)")
    parser.add_argument(
        "--arch", choices=TORCHVISION_RESNETS, help="torchvision architecture (default: inferred)"
    )
    parser.add_argument(
        "--per-parameter", action="store_true", help="one row per parameter name as well"
    )


def run(args: argparse.Namespace) -> int:
    state_dict = load_state_dict_file(args.checkpoint)
    arch = args.arch or infer_arch(state_dict)
    model = torchvision_from_state_dict(state_dict, arch)
    rows = smoothness_report(model, per_parameter=args.per_parameter)
    print(f"{args.checkpoint}: {arch}, metrics in the ODE parametrisation")
    print(format_table(rows))
    return 0


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The torchvision ResNet whose parameter names and shapes (head aside) match ``state_dict``.

    Raises:
        ValueError: no architecture, or more than one, matches.
    """
    matches = []
    for arch in TORCHVISION_RESNETS:
        with torch.device("meta"):
            model = torchvision_resnet(arch)
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


def _body_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if not key.startswith("fc.") and not key.rsplit(".", 1)[-1].startswith(MARKER)
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of :func:`~resode_lightning.smoothness_report` as an aligned text table."""
    columns = ["stage", "parameter", "depth", "form", *METRICS]
    cells = [columns] + [
        [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i >= 2 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    )
