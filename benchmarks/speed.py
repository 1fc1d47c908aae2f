"""Inference latency of the exported neural ODE against the source ResNet, arms interleaved.

For each model (torchvision's resnet50 and resnet152, and an ``ode_resnet`` with one stage of
16 blocks of width 16, i.i.d. init; random weights with non-trivial BatchNorm statistics, eval
mode) five arms run on the same batch on the same device, under ``no_grad``:

- ``ResNet``: the source model as it is;
- ``ResNet, BN folded``: the source with every conv-BatchNorm pair folded by
  ``torch.fx.experimental.optimization.fuse``, the like-for-like baseline for an export that
  folds too;
- ``neural ODE, L``: :func:`export_neural_ode` with Euler at each stage's depth, BatchNorm
  folded (the default): the same function as the source;
- ``neural ODE, L/2`` and ``neural ODE, L/4``: the same export at half and a quarter of the
  steps per stage (rounded, at least one).

After ``--warmup`` rounds, every round runs each arm once, in an order rotated every round, so
that the arms share the machine's drift (other processes, frequency changes); the figures are
medians over rounds and every ratio is a ratio of medians of one run. On CPU the CPU time of
the computing thread (``time.thread_time``, one thread) is recorded beside the wall-clock
time: its ratios leave out the time the process waits for a core on a shared machine. The
issue's targets (:data:`TARGETS`, judged on wall-clock time; on CPU also on CPU time): export
at L <= 1.05x the source for every model, resnet152 at L/2 <= 0.62x, ``ode_resnet`` at L/4
<= 0.30x; and exactness: Euler at L reproduces the source's logits to a max relative
difference <= 1e-5 in float32 (:data:`EXACT`).

    python benchmarks/speed.py [--device cpu|cuda] [--size PX] [--batch N] [--rounds N]

Defaults: CPU with one thread, 64x64 images, batch 8. On a GPU:
``--device cuda --size 224 --batch 64`` (cuDNN autotuned, TF32 off: float32 convolutions).
Writes ``results/speed_{device}.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS, environment, write_results
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from resode_lightning.core.io.atomic import atomic_write_text
from resode_lightning.core.models import ode_resnet, torchvision_resnet
from resode_lightning.core.stages import find_stages
from resode_lightning.export import export_neural_ode
from resode_lightning.export.solve import NeuralODEStage

MODELS: tuple[str, ...] = ("resnet50", "resnet152", "ode_resnet")
TARGETS: dict[str, dict[str, float]] = {
    "resnet50": {"neural ODE, L": 1.05},
    "resnet152": {"neural ODE, L": 1.05, "neural ODE, L/2": 0.62},
    "ode_resnet": {"neural ODE, L": 1.05, "neural ODE, L/4": 0.30},
}
"""Upper bounds on median latency / the source's, per model and arm."""
EXACT = 1e-5
"""Upper bound on the max relative difference of the L-step export's logits from the source's."""


def source_model(name: str) -> nn.Module:
    """The named model with random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    if name == "ode_resnet":
        model = ode_resnet(depths=(16,), widths=(16,), init="iid", seed=0)
    else:
        model = torchvision_resnet(name)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def arms(source: nn.Module) -> dict[str, nn.Module]:
    """The five models timed against each other (see the module docstring)."""
    return {
        "ResNet": source,
        "ResNet, BN folded": fuse(source),
        "neural ODE, L": export_neural_ode(source, method="euler"),
        "neural ODE, L/2": export_neural_ode(source, method="euler", steps=0.5),
        "neural ODE, L/4": export_neural_ode(source, method="euler", steps=0.25),
    }


def interleaved(
    models: dict[str, nn.Module], x: Tensor, rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds (of this thread) per forward of each model on ``x``: one
    forward of each per round, order rotated."""
    names = list(models)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    sync: Callable[[], None] = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        for round_ in range(warmup + rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                started, started_cpu = time.perf_counter(), time.thread_time()
                models[name](x)
                sync()
                if round_ >= warmup:
                    wall[name].append(time.perf_counter() - started)
                    cpu[name].append(time.thread_time() - started_cpu)
    return wall, cpu


def stage_steps(model: nn.Module) -> str:
    """Steps per stage of an export ("/"-joined), or "" for a source model."""
    return "/".join(str(m.steps) for m in model.modules() if isinstance(m, NeuralODEStage))


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    """One row per arm of model ``name``."""
    device = torch.device(args.device)
    source = source_model(name).to(device)
    models = {arm: model.to(device) for arm, model in arms(source).items()}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    with torch.no_grad():
        reference = source(x)
        errors = {
            arm: float((model(x) - reference).abs().max() / reference.abs().max())
            for arm, model in models.items()
        }
    times, cpu_times = interleaved(models, x, args.rounds, args.warmup)
    base = statistics.median(times["ResNet"])
    folded = statistics.median(times["ResNet, BN folded"])
    cpu_base = statistics.median(cpu_times["ResNet"])
    depths = "/".join(str(stage.depth) for stage in find_stages(source))
    rows = []
    for arm, samples in times.items():
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
        cpu_ratio = statistics.median(cpu_times[arm]) / cpu_base
        target = TARGETS[name].get(arm)
        exact = ""
        if arm == "neural ODE, L":
            exact = "yes" if errors[arm] <= EXACT else "NO"
        row = {
            "model": name,
            "stage depths L": depths,
            "arm": arm,
            "steps per stage": stage_steps(models[arm]),
            "median ms": round(1e3 * median, 2),
            "IQR ms": f"{1e3 * quartiles[0]:.2f}–{1e3 * quartiles[2]:.2f}",
            "ratio to ResNet": round(median / base, 3),
            "ratio to folded ResNet": round(median / folded, 3),
            "target": "" if target is None else f"<= {target:.2f}",
            "met": "" if target is None else ("yes" if median / base <= target else "NO"),
        }
        if device.type == "cpu":
            row["CPU-time ratio to ResNet"] = round(cpu_ratio, 3)
            row["met (CPU time)"] = (
                "" if target is None else ("yes" if cpu_ratio <= target else "NO")
            )
        row["max rel. diff. vs ResNet"] = f"{errors[arm]:.1e}"
        row[f"exact (<= {EXACT:.0e})"] = exact
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Bars of each arm's median latency relative to the source ResNet, per model; a black
    tick marks each target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    names = list(dict.fromkeys(row["arm"] for row in rows))
    figure, axis = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(names)
    for index, arm in enumerate(names):
        positions = [m + (index - (len(names) - 1) / 2) * width for m in range(len(models))]
        ratios = [
            next(r["ratio to ResNet"] for r in rows if r["model"] == m and r["arm"] == arm)
            for m in models
        ]
        axis.bar(positions, ratios, width, label=arm)
        for position, model in zip(positions, models):
            target = TARGETS[model].get(arm)
            if target is not None:
                axis.plot([position - width / 2, position + width / 2], [target] * 2, "k-", lw=2)
    axis.plot([], [], "k-", lw=2, label="target")
    axis.set_xticks(range(len(models)), models)
    axis.set_ylabel("median latency / source ResNet")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, default=64, help="image side (GPU: 224)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward (GPU: 64)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False  # float32 convolutions: exactness is checked
    rows = [row for name in args.models for row in measure(name, args)]
    env = environment(args.device)
    load = cpu_note = ""
    if args.device == "cpu":
        cpu_note = (
            " 'CPU-time': the same ratio of medians, of the CPU time of the (single) computing "
            "thread per forward instead of wall-clock time: on a shared machine it leaves out "
            "the time the process waits for a core, the main noise of the wall-clock figures."
        )
    if args.device == "cpu" and hasattr(os, "getloadavg"):
        load = (
            f" 1-min load average {os.getloadavg()[0]:.1f} at the end (other jobs share the CPU)."
        )
    notes = (
        f"Batch {args.batch} of {args.size}x{args.size} random images, float32 (on CUDA: TF32 "
        f"off), no_grad; "
        f"{args.rounds} rounds after {args.warmup} warm-up rounds, the five arms of a model "
        f"interleaved (order rotated each round); medians and interquartile ranges per forward. "
        f"Ratios are of medians of this run. The neural ODE arms fold BatchNorm into the convs; "
        f"'ResNet, BN folded' is the source folded by torch.fx, the like-for-like baseline. "
        f"'exact': the L-step export's max relative difference from the source's logits."
        + cpu_note
        + load
    )
    name = f"speed_{args.device}"
    path = write_results(name, env, rows, list(rows[0]), notes)
    payload = {"environment": env, "arguments": vars(args), "rows": rows, "notes": notes}
    atomic_write_text(json.dumps(payload, indent=2) + "\n", RESULTS / f"{name}.json")
    plot(rows, RESULTS / f"{name}.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
