"""Depth-flexible inference: accuracy and latency of exported neural ODEs at fewer steps.

Three models trained on scikit-learn's digits (nothing downloaded):

- ``tied``: the ODE-ResNet of ``configs/digits_ode_resnet.yaml`` (one stage of L = 16
  pre-activation blocks, tied "smooth" initialisation);
- ``iid``: the same net with i.i.d. initialisation (``configs/digits_iid.yaml``);
- ``resnet34``: torchvision's resnet34 with a 1-channel stem, 32x32 images, trained briefly
  with the same data module, optimiser and schedule. Its residual stages (identity blocks after
  each downsampling block) have L = 3, 3, 5, 2: resnet18's have 2, 1, 1, 1, too shallow to
  halve, and the bottleneck nets cost several times more to train on two CPU cores.

Each trained model is exported with :func:`export_neural_ode` (BatchNorm folded, linear weight
path) and run on the test split with Euler and RK4 at L, L/2 and L/4 steps per stage (``steps``
as a fraction of each stage's depth, rounded, at least 1), with the weight path stored at fewer
``knots`` (L/2 and L/4, at least 2 and at most the shallowest stage's depth; Euler at L steps
and at as many steps as knots), and with dopri5 at two tolerances, whose function evaluations
(calls of the stages' vector fields per forward) are counted by a forward pre-hook. Latency is
the median time of one forward of a batch of test images, all variants of a model interleaved
in every repetition (round robin, after a warm-up) so that they share the machine's drift.

    python benchmarks/depth.py [--device cpu|cuda] [--from-runs DIR] [--epochs N]

Writes ``results/depth{_cuda}.{json,md,png}``; training runs (Lightning logs, checkpoints, the
exports written by ``NeuralODEExport``) go to ``--runs`` (default ``runs/bench_depth``).
``--from-runs DIR`` reuses ``DIR/<name>/version_*/checkpoints/last.ckpt`` (the newest version)
where it exists, e.g. ``--from-runs runs`` after ``make demo`` for the two ODE-ResNets, and
trains the others into ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import RESULTS, environment, write_results
from torch import Tensor, nn

from resode_lightning.apps.demo import CONFIGS, idle_cores
from resode_lightning.cli.train import cli
from resode_lightning.core.io.atomic import atomic_write, atomic_write_text
from resode_lightning.core.stages import find_stages
from resode_lightning.export import NeuralODEStage, VectorField, export_neural_ode

FRACTIONS = {"L": 1.0, "L/2": 0.5, "L/4": 0.25}
TOLERANCES = {"dopri5 (rtol 1e-5, atol 1e-6)": (1e-5, 1e-6), "dopri5 (rtol 1e-3)": (1e-3, 1e-4)}
LOOSEST = 1e-3
"""Post-activation stages get only this tolerance: the projected field is discontinuous where
the state crosses zero, and at the export's default ``rtol=1e-5`` dopri5 needs thousands of
evaluations per stage (minutes per batch on a CPU)."""
SLOW_S = 0.5
"""Variants slower than this per forward are timed in their accuracy pass, not interleaved."""
RESNET = {
    "backbone": "resnet34",
    "backbone_kwargs": {},
    "optimizer": "adamw",
    "lr": 0.001,
    "weight_decay": 0.05,
    "schedule": "cosine",
}


def run_config(name: str, runs: Path, epochs: dict[str, int | None]) -> dict[str, Any]:
    """The config of model ``name`` with every output redirected under ``runs``."""
    base = "digits_iid.yaml" if name == "iid" else "digits_ode_resnet.yaml"
    config = yaml.safe_load((CONFIGS / base).read_text())
    folder = {"tied": "digits_ode_resnet", "iid": "digits_iid"}.get(name, f"digits_{name}")
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(runs / folder)
    trainer["logger"]["init_args"].update(save_dir=str(runs), name=folder)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("NeuralODEExport"):
            callback["init_args"]["path"] = str(runs / folder / "neural_ode.pt")
    if name == "resnet34":
        config["model"] = dict(RESNET)
        config["data"]["init_args"]["image_size"] = 32
    if epochs.get(name) is not None:
        trainer["max_epochs"] = epochs[name]
    return config


def trained_model(
    name: str, runs: Path, reuse: Path | None, epochs: dict[str, int | None], accelerator: str
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(backbone in eval mode, data module, training record)``: loaded or freshly trained."""
    config = run_config(name, reuse or runs, epochs)
    folder = Path(config["trainer"]["default_root_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench_config.yaml"
    atomic_write_text(yaml.safe_dump(config, sort_keys=False), path)
    options = ["--config", str(path), f"--trainer.accelerator={accelerator}"]
    found = sorted(
        folder.glob("version_*/checkpoints/last.ckpt"),
        key=lambda p: int(p.parts[-3].removeprefix("version_")),
    )
    if reuse is not None and found:
        print(f"{name}: loading {found[-1]}", flush=True)
        run = cli([*options, f"--model.weights={found[-1]}"], run=False)
        record = {"checkpoint": str(found[-1]), "epochs": None, "train_s": None}
    else:
        print(f"{name}: training ({config['trainer']['max_epochs']} epochs)", flush=True)
        run = cli([*options, "--trainer.enable_progress_bar=false"], run=False)
        started = time.perf_counter()
        run.trainer.fit(run.model, run.datamodule)
        record = {
            "checkpoint": run.trainer.checkpoint_callback.last_model_path,
            "epochs": run.trainer.current_epoch,
            "train_s": time.perf_counter() - started,
        }
    return run.model.backbone.eval(), run.datamodule, record


def variants(backbone: nn.Module) -> dict[str, tuple[dict[str, Any], nn.Module]]:
    """``{label: (description, model)}``: the source and every export measured."""
    depths = [stage.depth for stage in find_stages(backbone)]
    out: dict[str, tuple[dict[str, Any], nn.Module]] = {
        "ResNet": ({"method": "source", "steps": "L", "knots": None}, backbone)
    }
    for method in ("euler", "rk4"):
        for label, fraction in FRACTIONS.items():
            model = export_neural_ode(backbone, method=method, steps=fraction)
            out[f"{method} {label}"] = ({"method": method, "steps": label, "knots": None}, model)
    seen = set()
    for label, fraction in list(FRACTIONS.items())[1:]:
        knots = max(2, round(fraction * min(depths)))
        if knots in seen:
            continue
        seen.add(knots)
        for steps in ("L", label):
            model = export_neural_ode(backbone, steps=FRACTIONS[steps], knots=knots)
            key = f"euler {steps}, knots {knots}"
            out[key] = ({"method": "euler", "steps": steps, "knots": knots}, model)
    post = any(stage.post is not None for stage in find_stages(backbone))
    for label, (rtol, atol) in TOLERANCES.items():
        if post and rtol < LOOSEST:
            continue
        model = export_neural_ode(backbone, method="dopri5", rtol=rtol, atol=atol)
        out[label] = ({"method": "dopri5", "steps": "adaptive", "knots": None}, model)
    return out


class _CallCounter:
    """A forward pre-hook counting calls of the vector fields (function evaluations)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handles = [
            module.register_forward_pre_hook(self._count)
            for module in model.modules()
            if isinstance(module, VectorField)
        ]

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def evaluate(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]]
) -> tuple[dict[str, float], list[float]]:
    """Accuracy over ``batches`` and the mean function evaluations per stage and batch; and the
    seconds of each forward of a full-size batch."""
    stages = sum(isinstance(m, NeuralODEStage) for m in model.modules())
    counter = _CallCounter(model)
    correct = total = 0
    seconds = []
    sync = torch.cuda.synchronize if batches[0][0].is_cuda else (lambda: None)
    with torch.no_grad():
        for images, labels in batches:
            sync()
            started = time.perf_counter()
            logits = model(images)
            sync()
            if len(labels) == len(batches[0][1]):
                seconds.append(time.perf_counter() - started)
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    counter.remove()
    evaluations = counter.calls / (len(batches) * stages) if stages else None
    return {"accuracy": correct / total, "evaluations_per_stage": evaluations}, seconds


def interleaved_latency(
    models: dict[str, nn.Module], x: Tensor, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per forward of each model on ``x``, the models alternated in every repetition.

    The order is rotated every repetition so that no model always runs first.
    """
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    sync: Callable[[], None] = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for repeat in range(warmup + repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                started = time.perf_counter()
                models[name](x)
                sync()
                if repeat >= warmup:
                    times[name].append(time.perf_counter() - started)
    return times


def measure(
    name: str, backbone: nn.Module, data: Any, device: torch.device, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One row per variant of ``backbone``: accuracy, evaluations, latency, parameters."""
    backbone = backbone.to(device)
    data.setup("test")
    images, labels = (torch.cat(parts) for parts in zip(*data.test_dataloader()))
    images, labels = images.to(device), labels.to(device)
    batches = list(zip(images.split(args.batch), labels.split(args.batch)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        models = variants(backbone)
    depths = [stage.depth for stage in find_stages(backbone)]
    rows, slow = [], {}
    for label, (description, model) in models.items():
        steps = [m.steps for m in model.modules() if isinstance(m, NeuralODEStage)]
        result, seconds = evaluate(model, batches)
        if statistics.median(seconds) > SLOW_S:
            slow[label] = seconds
        rows.append(
            {
                "model": name,
                "variant": label,
                "test_images": len(labels),
                **description,
                "steps_per_stage": steps or depths,
                "parameters": sum(p.numel() for p in model.parameters()),
                **result,
            }
        )
        print(f"{name:>8} {label:<32} {100 * result['accuracy']:5.1f}%", flush=True)
    x = batches[0][0]
    fast = {label: model for label, (_, model) in models.items() if label not in slow}
    times = interleaved_latency(fast, x, args.repeats, args.warmup)
    times |= slow
    source = statistics.median(times["ResNet"])
    for row in rows:
        row["latency_ms"] = 1e3 * statistics.median(times[row["variant"]])
        row["latency_ratio"] = row["latency_ms"] / (1e3 * source)
        row["latency_iqr_ms"] = 1e3 * _iqr(times[row["variant"]])
        row["accuracy_change"] = row["accuracy"] - rows[0]["accuracy"]
        row["interleaved"] = row["variant"] not in slow
    return rows


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (top) and latency (bottom) against steps per stage, one column per model."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(row["model"] for row in rows))
    figure = Figure(figsize=(4 * len(models), 6), layout="constrained")
    axes = figure.subplots(2, len(models), squeeze=False)
    order = list(FRACTIONS)
    for column, name in enumerate(models):
        mine = [row for row in rows if row["model"] == name]
        source = mine[0]
        top, bottom = axes[0][column], axes[1][column]
        lines = [(m, None) for m in ("euler", "rk4")]
        lines += sorted({("euler", r["knots"]) for r in mine if r["knots"] is not None})
        for method, knots in lines:
            points = sorted(
                (order.index(r["steps"]), r)
                for r in mine
                if r["method"] == method and r["knots"] == knots
            )
            x = [FRACTIONS[r["steps"]] for _, r in points]
            label = method if knots is None else f"{method}, {knots} knots"
            style = "o-" if knots is None else "s--"
            top.plot(x, [100 * r["accuracy"] for _, r in points], style, label=label)
            bottom.plot(x, [r["latency_ms"] for _, r in points], style, label=label)
        for row in mine:
            if row["method"] == "dopri5":
                top.axhline(100 * row["accuracy"], color="tab:purple", lw=0.8, ls=":")
        top.axhline(100 * source["accuracy"], color="grey", lw=1, ls="--", label="ResNet")
        bottom.axhline(source["latency_ms"], color="grey", lw=1, ls="--", label="ResNet")
        depth = "/".join(str(d) for d in source["steps_per_stage"])
        top.set_title(f"{name} (L = {depth})")
        for axis in (top, bottom):
            axis.set_xscale("log", base=2)
            axis.set_xticks(list(FRACTIONS.values()), list(FRACTIONS))
            axis.grid(alpha=0.3)
        top.set_ylim(0, 100)
        top.set_ylabel("test accuracy (%)")
        bottom.set_ylabel("latency (ms per batch)")
        bottom.set_xlabel("steps per stage")
        top.legend(fontsize=7)
    figure.suptitle("dotted purple: dopri5", fontsize=8)
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def table(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for row in rows:
        evaluations = row["evaluations_per_stage"]
        out.append(
            {
                "model": row["model"],
                "variant": row["variant"],
                "steps per stage": "/".join(str(s) for s in row["steps_per_stage"])
                if row["method"] != "dopri5"
                else "adaptive",
                "field evals per stage": "—" if evaluations is None else f"{evaluations:.1f}",
                "parameters": f"{row['parameters']:,}",
                "test accuracy": f"{100 * row['accuracy']:.1f}%",
                "Δ vs ResNet": f"{100 * row['accuracy_change']:+.1f}",
                "latency (ms)": f"{row['latency_ms']:.2f} ± {row['latency_iqr_ms'] / 2:.2f}"
                + ("" if row["interleaved"] else " †"),
                "latency / ResNet": f"{row['latency_ratio']:.2f}",
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", default="runs/bench_depth", help="where training runs go")
    parser.add_argument("--from-runs", type=Path, help="reuse checkpoints found in this folder")
    parser.add_argument("--models", nargs="+", default=["tied", "iid", "resnet34"])
    parser.add_argument("--epochs", type=int, help="epochs of the ODE-ResNets (config: 15)")
    parser.add_argument("--resnet-epochs", type=int, default=6, help="epochs of resnet34")
    parser.add_argument("--batch", type=int, default=64, help="images per forward")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads (default: idle cores)")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - {"tied", "iid", "resnet34"})
    if unknown:
        parser.error(f"unknown models {unknown}; choose from tied, iid, resnet34")
    if args.device == "cpu":
        torch.set_num_threads(args.threads or idle_cores())
    device = torch.device(args.device)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    epochs = {"tied": args.epochs, "iid": args.epochs, "resnet34": args.resnet_epochs}
    rows, training = [], {}
    for name in args.models:
        backbone, data, record = trained_model(
            name, Path(args.runs), args.from_runs, epochs, accelerator
        )
        training[name] = record
        rows += measure(name, backbone, data, device, args)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    env = environment(args.device)
    RESULTS.mkdir(exist_ok=True)
    plot(rows, RESULTS / f"depth{suffix}.png")
    columns = list(table(rows)[0])
    notes = (
        f"Test split of digits ({rows[0]['test_images']} images) in batches of "
        f"{args.batch}; latency of one batch, median ± half the interquartile range over "
        f"{args.repeats} repetitions, all variants of a model interleaved. Field evals per "
        f"stage: calls of a stage's vector field per forward of one batch (mean over batches "
        f"and stages); Euler makes one per step, RK4 four. † slower than {SLOW_S} s per forward: "
        f"the forwards of the full-size test batches of the accuracy pass, not interleaved. "
        f"dopri5 on post-activation stages (resnet34) only at rtol {LOOSEST:g}. Training: "
        + "; ".join(
            f"{name} {r['epochs']} epochs in {r['train_s']:.0f} s"
            if r["train_s"] is not None
            else f"{name} from {r['checkpoint']}"
            for name, r in training.items()
        )
        + "."
    )
    path = write_results(f"depth{suffix}", env, table(rows), columns, notes)
    payload = {"environment": env, "training": training, "rows": rows}
    atomic_write_text(json.dumps(payload, indent=2) + "\n", RESULTS / f"depth{suffix}.json")
    print(Path(path).read_text())


if __name__ == "__main__":
    main()
