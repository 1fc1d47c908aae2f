"""Measure peak memory and time of one training step of a residual stage, per gradient mode.

Every argument is checked against its range before anything is measured (the device and the
size of the input state once the command line is read); a value out of range ends the command
with one line naming it and its range, and status 2.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable

import torch

from resode_lightning.apps.memory_benchmark import MODES, memory_benchmark

HELP = "peak memory and time of one training step: ResNet stage vs neural ODE gradient modes"
MAX_STATE_BYTES = 2**30
"""The most bytes the input state (``--batch`` x ``--width`` x ``--size`` squared floats) may
take."""


def integer_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high``, else a message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from {low} to {high}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse ``type``: ``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cpus = os.cpu_count() or 1
    parser.add_argument(
        "--steps",
        type=integer_in(1, 4096),
        nargs="+",
        default=[4, 8, 16, 32, 64, 128, 256],
        help="numbers of steps to measure, each 1 to 4096",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--width", type=integer_in(1, 1024), default=16, help="channels of the stage, 1 to 1024"
    )
    parser.add_argument(
        "--size", type=integer_in(1, 1024), default=16, help="spatial size of the state, 1 to 1024"
    )
    parser.add_argument(
        "--batch",
        type=integer_in(1, 4096),
        default=8,
        help=f"batch size, 1 to 4096 (the state may take at most {MAX_STATE_BYTES // 2**20} MiB)",
    )
    parser.add_argument(
        "--depth", type=integer_in(1, 256), default=4, help="blocks of the exported stage, 1 to 256"
    )
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--repeats", type=integer_in(1, 100), default=3, help="measurements per cell, 1 to 100"
    )
    parser.add_argument(
        "--threads",
        type=integer_in(1, cpus),
        default=1,
        help=f"CPU threads, 1 to the number of CPUs ({cpus} here; default 1)",
    )


def check_device(device: str) -> None:
    """Raise ``ValueError`` unless ``device`` (``cpu``, ``cuda[:N]``) exists on this machine."""
    if device == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )


def check_state_size(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` when the input state would take more than :data:`MAX_STATE_BYTES`."""
    state_bytes = args.batch * args.width * args.size**2 * 4
    if state_bytes > MAX_STATE_BYTES:
        raise ValueError(
            f"--batch {args.batch} x --width {args.width} x --size {args.size}^2 float32 values "
            f"take {state_bytes:,} bytes, more than {MAX_STATE_BYTES:,}; make one of them smaller"
        )


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
    """Run the memory benchmark with the options of :func:`add_arguments`.

    Raises:
        ValueError: the device does not exist here, or the state would be too large; raised
            before anything is measured.
    """
    check_device(args.device)
    check_state_size(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
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
