"""Peak memory and time of one training step of a residual stage against the number of steps.

Modes: plain ResNet stage, ODE form with backprop, torch.utils.checkpoint per block, raw
torchdiffeq odeint_adjoint, and the package's three gradient modes (see resode_lightning.bench).
Writes benchmarks/results/memory_<device>.{json,png,md}.

    python benchmarks/memory.py                       # CPU proxy, steps 4 ... 256
    python benchmarks/memory.py --device cuda         # torch.cuda.max_memory_allocated
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from resode_lightning.cli.bench import add_arguments, measure, ratio_lines, table
from resode_lightning.core.io import atomic_write, atomic_write_text

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = measure(args, own_process=True)
    device = torch.device(args.device).type
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory_{device}"
    atomic_write_text(json.dumps(result, indent=2), stem.with_suffix(".json"))
    atomic_write_text(
        f"Peak memory and time of one training step ({result['device']}, width {args.width}, "
        f"{args.size}x{args.size}, batch {args.batch}, one state = {result['state_bytes']} bytes; "
        f"exported stages have {args.depth} blocks)\n\n{table(result)}\n\n{ratio_lines(result)}\n",
        stem.with_suffix(".md"),
    )
    plot(result, stem.with_suffix(".png"))
    print(table(result))
    print(ratio_lines(result))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(row["mode"] for row in result["rows"]):
        rows = [row for row in result["rows"] if row["mode"] == mode]
        steps = [row["steps"] for row in rows]
        memory.plot(steps, [row["peak_bytes"] / 2**20 for row in rows], marker="o", label=mode)
        seconds.plot(steps, [row["seconds"] * 1e3 for row in rows], marker="o", label=mode)
    for axis, label in ((memory, "peak memory of one step (MiB)"), (seconds, "time per step (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("steps (blocks)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    memory.legend(fontsize=8)
    figure.suptitle(f"one training step, {result['device']}")
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))


if __name__ == "__main__":
    main()
