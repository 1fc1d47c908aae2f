"""Measure peak memory and time of one training step of a residual stage, per gradient mode."""

from __future__ import annotations

import argparse

import torch

from resode_lightning.memory_benchmark import MODES, memory_benchmark

HELP = "peak memory and time of one training step: ResNet stage vs neural ODE gradient modes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--width", type=int, default=16, help="channels of the stage")
    parser.add_argument("--size", type=int, default=16, help="spatial size of the state")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4, help="blocks of the exported stage")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")


def table(result: dict) -> str:
    """A markdown table: peak MiB and ms per step for every mode and number of steps."""
    steps = sorted({row["steps"] for row in result["rows"]})
    modes = list(dict.fromkeys(row["mode"] for row in result["rows"]))
    cell = {(row["mode"], row["steps"]): row for row in result["rows"]}
    lines = [
        "| mode | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for mode in modes:
        values = []
        for count in steps:
            row = cell.get((mode, count))
            values.append(
                ""
                if row is None
                else f"{row['peak_bytes'] / 2**20:.2f} MiB, {row['seconds'] * 1e3:.0f} ms"
            )
        lines.append(f"| {mode} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict:
    """Run the memory benchmark with the options of :func:`add_arguments`."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    return memory_benchmark(
        args.steps,
        args.modes,
        width=args.width,
        size=args.size,
        batch=args.batch,
        depth=args.depth,
        device=args.device,
        repeats=args.repeats,
        log=print,
    )


def ratio_lines(result: dict) -> str:
    return "\n".join(f"- {key}: {value:.3f}" for key, value in result["ratios"].items())


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    print(table(result))
    print(ratio_lines(result))
    return 0
