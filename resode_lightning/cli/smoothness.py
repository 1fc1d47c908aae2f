"""Print the per-stage smoothness-in-depth table of a torchvision ResNet checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from resode_lightning.cli._common import add_architecture, add_max_classes, load_model
from resode_lightning.core.metrics import METRICS, smoothness_report

HELP = "print the per-stage weight smoothness of a ResNet checkpoint (.pth/.ckpt)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="state dict (.pth, Lightning .ckpt, .safetensors)")
    add_architecture(parser, inferred=True)
    parser.add_argument(
        "--per-parameter", action="store_true", help="one row per parameter name as well"
    )
    add_max_classes(parser)


def run(args: argparse.Namespace) -> int:
    model, arch = load_model(
        args.checkpoint, args.arch, args.arch_kwargs, max_classes=args.max_classes
    )
    rows = smoothness_report(model, per_parameter=args.per_parameter)
    print(f"{args.checkpoint}: {arch.spec}, metrics in the ODE parametrisation")
    print(format_table(rows))
    return 0


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
