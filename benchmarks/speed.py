"""Inference speed of the exported neural ODE against the source ResNet, A/B interleaved.

For each model (an ``ode_resnet`` with its default three stages of 8 blocks, and torchvision's
resnet50, random weights with non-trivial BatchNorm statistics, eval mode) four arms run on the
same batch on the same device:

- ``ResNet``: the source model as it is;
- ``ResNet, BN folded``: the source with every conv-BatchNorm pair folded by
  ``torch.fx.experimental.optimization.fuse``, the fair baseline for an export that folds too;
- ``neural ODE, L``: :func:`export_neural_ode` with Euler at each stage's depth, BatchNorm
  folded (the default): the same function as the source;
- ``neural ODE, L/2``: the same export at half the steps per stage.

After ``--warmup`` rounds, every round runs each arm once, in an order rotated every round, so
that the arms share the machine's drift (other processes, frequency changes); the figures are
medians over rounds. The issue's targets: export at L steps / source <= 1.10, at L/2 <= 0.60.

    python benchmarks/speed.py [--device cpu|cuda] [--size PX] [--batch N] [--rounds N]

Defaults: CPU, 64x64 images, batch 16. On a GPU: ``--device cuda --size 224 --batch 64``.
Writes ``results/speed_{device}.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from _common import RESULTS, environment, write_results
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from resode_lightning.core.io import atomic_write_text
from resode_lightning.core.models import ode_resnet, torchvision_resnet
from resode_lightning.core.stages import find_stages
from resode_lightning.demo import idle_cores
from resode_lightning.export import export_neural_ode

TARGETS = {"neural ODE, L": 1.10, "neural ODE, L/2": 0.60}


def source_model(name: str) -> nn.Module:
    """The named model with random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = ode_resnet(init="iid", seed=0) if name == "ode_resnet" else torchvision_resnet(name)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def arms(source: nn.Module) -> dict[str, nn.Module]:
    """The four models timed against each other (see the module docstring)."""
    return {
        "ResNet": source,
        "ResNet, BN folded": fuse(source),
        "neural ODE, L": export_neural_ode(source, method="euler"),
        "neural ODE, L/2": export_neural_ode(source, method="euler", steps=0.5),
    }


def interleaved(
    models: dict[str, nn.Module], x: Tensor, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per forward of each model on ``x``: one forward of each per round, order rotated."""
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    sync: Callable[[], None] = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        for round_ in range(warmup + rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                started = time.perf_counter()
                models[name](x)
                sync()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - started)
    return times


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
    times = interleaved(models, x, args.rounds, args.warmup)
    base = statistics.median(times["ResNet"])
    folded = statistics.median(times["ResNet, BN folded"])
    depths = "/".join(str(stage.depth) for stage in find_stages(source))
    rows = []
    for arm, samples in times.items():
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
        target = TARGETS.get(arm)
        rows.append(
            {
                "model": name,
                "stage depths L": depths,
                "arm": arm,
                "median ms": round(1e3 * median, 2),
                "IQR ms": f"{1e3 * quartiles[0]:.2f}–{1e3 * quartiles[2]:.2f}",
                "images/s": round(args.batch / median, 1),
                "ratio to ResNet": round(median / base, 3),
                "ratio to folded ResNet": round(median / folded, 3),
                "target": "" if target is None else f"<= {target:.2f}",
                "met": "" if target is None else ("yes" if median / base <= target else "NO"),
                "max rel. diff. vs ResNet": f"{errors[arm]:.1e}",
            }
        )
        print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path) -> None:
    """Bars of each arm's median latency relative to the source ResNet, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(arms)
    for index, arm in enumerate(arms):
        ratios = [
            next(r["ratio to ResNet"] for r in rows if r["model"] == m and r["arm"] == arm)
            for m in models
        ]
        positions = [m + (index - (len(arms) - 1) / 2) * width for m in range(len(models))]
        axis.bar(positions, ratios, width, label=arm)
    for (arm, target), style in zip(TARGETS.items(), (":", "--")):
        axis.axhline(target, linestyle=style, color="gray", label=f"target for {arm}: {target}")
    axis.set_xticks(range(len(models)), models)
    axis.set_ylabel("median latency / source ResNet")
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["ode_resnet", "resnet50"])
    parser.add_argument("--size", type=int, default=64, help="image side (GPU: 224)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward (GPU: 64)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="CPU threads (default: idle cores)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads or idle_cores())
    else:
        torch.backends.cudnn.benchmark = True
    rows = [row for name in args.models for row in measure(name, args)]
    env = environment(args.device)
    load = ""
    if args.device == "cpu" and hasattr(os, "getloadavg"):
        load = (
            f" 1-min load average {os.getloadavg()[0]:.1f} at the end (other jobs share the CPU)."
        )
    notes = (
        f"Batch {args.batch} of {args.size}x{args.size} random images, float32, no_grad; "
        f"{args.rounds} rounds after {args.warmup} warm-up rounds, the four arms of a model "
        f"interleaved (order rotated each round); medians and interquartile ranges per forward. "
        f"Ratios are of medians. The neural ODE arms fold BatchNorm into the convs; "
        f"'ResNet, BN folded' is the source folded by torch.fx, the like-for-like baseline." + load
    )
    name = f"speed_{args.device}"
    path = write_results(name, env, rows, list(rows[0]), notes)
    payload = {"environment": env, "arguments": vars(args), "rows": rows, "notes": notes}
    atomic_write_text(json.dumps(payload, indent=2) + "\n", RESULTS / f"{name}.json")
    plot(rows, RESULTS / f"{name}.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
