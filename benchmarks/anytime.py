"""Anytime depth: one checkpoint at any number of steps, side by side on digits (3 seeds).

Arms, each for every seed (the seed of the model's initialisation, the data split and the
training order; nothing downloaded):

- ``tied``/``iid``, ``normal``/``sampled``: an ``ode_resnet`` with one stage of L = 16 blocks
  of width 16 (``configs/digits_ode_resnet.yaml``: the demo's SGD schedule, 15 epochs), tied or
  i.i.d. initialisation, trained normally or with :class:`~resode_lightning.DepthSampling`
  (``steps=(1.0, 0.5, 0.25)``, each pass's loss the cross-entropy on the labels), then
  exported (BatchNorm folded); the tied net also with DepthSampling's options of
  :data:`SAMPLING` (issue 20: anytime nets that stay ODEs): RK4 passes beside the Euler ones
  (``sampled+rk4``), a roughness penalty in depth (``sampled+roughness``), both;
- ``iid net``: the normally trained i.i.d. net (the demo's), as a source for the already-trained
  path: ``plain export``; ``knot projection`` (the weight path fitted at L/2 knots, no
  training); ``fine-tune`` (:func:`~resode_lightning.distill_depth` at full depth
  only); ``distilled`` (``distill_depth`` at ``(1.0, 0.5, 0.25)``), 5 epochs each, AdamW at
  :data:`DISTILL_LR`, the distilled arm with the further settings of :data:`DISTILL_RECIPE`;
- ``resnet``: ``torchvision.models.ResNet(BasicBlock, [2, 2, 16, 2])`` (stages: layer1 with 2
  blocks, layer3 with 15 identity blocks), 1-channel stem, 32x32 images, trained normally
  (AdamW, 6 epochs), with the same four variants (knots: 2, the most layer1 allows).

Every export runs on the test split at Euler L, L/2 and L/4 steps per stage (fractions of each
stage's depth) and at RK4 with the same number of field evaluations (L/4, L/8, L/16 steps, at
least one), through :func:`~resode_lightning.export.anytime.accuracy_vs_steps` with the source
network timed alongside (one batch of 64, every setting interleaved, median over the repeated
passes). The issue's targets are judged on means over the seeds, with the spread (min–max).

    python benchmarks/anytime.py [--seeds 0 1 2] [--arms ...] [--report-only] [--output NAME]

Trained networks and per-arm results are cached under ``--runs`` (default
``runs/bench_anytime``), so a run can be split over processes (``--arms``) and resumed; the
report (``results/anytime.{json,md,png}``, or ``--output``) is written from every cached result
of the seeds. The distillation recipe of the ``iid net`` (:data:`DISTILL_RECIPE`) was chosen on
seeds 0 to 2; ``--seeds 3 4 5 --output anytime_heldout`` checks it on seeds it was not chosen
on. The DepthSampling options alone, against the Euler-only arm (about 5 minutes a seed on one
idle thread, more on a shared machine):

    python benchmarks/anytime.py --arms "tied sampled" "tied sampled+rk4" \
        "tied sampled+roughness" --output anytime_solvers
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from _common import RESULTS, cpu_trainer, environment, markdown_table
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from resode_lightning import DepthSampling, DigitsDataModule, ImageClassifier, ode_resnet
from resode_lightning.apps.demo import CONFIGS
from resode_lightning.callbacks.depth_passes import inplace_distillation
from resode_lightning.core.io.atomic import atomic_save, atomic_write, atomic_write_text
from resode_lightning.core.stages import find_stages
from resode_lightning.export import accuracy_vs_steps, export_neural_ode
from resode_lightning.lit.distillation import distill_depth

SETTINGS: list[tuple[str, float]] = [
    ("euler", 1.0),
    ("euler", 0.5),
    ("euler", 0.25),
    ("rk4", 0.25),
    ("rk4", 0.125),
    ("rk4", 0.0625),
]
"""(method, steps as a fraction of each stage's depth): Euler at L, L/2, L/4 and RK4 at the
same field evaluations."""
BUDGETS = {1.0: "L", 0.5: "L/2", 0.25: "L/4"}
SOLVERS = {"methods": ("euler", "rk4"), "weights": (0.4, 0.4, 0.4)}
SAMPLING: dict[str, dict[str, Any]] = {
    "sampled": {},
    "sampled+rk4": SOLVERS,
    "sampled+roughness": {"roughness": 1e-3},
    "sampled+roughness-1e-2": {"roughness": 1e-2},
    "sampled+rk4+roughness": {**SOLVERS, "roughness": 1e-3},
    "sampled+kl": {"loss": inplace_distillation},
}
"""DepthSampling settings of each ``<init> <training>`` arm besides ``steps=(1.0, 0.5, 0.25)``
and its default loss (the cross-entropy on the labels): Euler only (two passes besides full depth);
Euler and RK4 at the same field evaluations (RK4 at L/4, L/8, L/16 steps; five passes, each
weighted 0.4 so that they weigh what the Euler-only arm's two do: at weight 1, the demo's SGD
at lr 0.5 diverged within 10 batches); Euler with the roughness penalty in depth (first
differences; weight 1e-3, and 1e-2 tried); both; Euler only with the KL divergence to the
full-depth output's softmax instead of the labels (``inplace_distillation``)."""
SCRATCH = (
    "tied normal",
    "tied sampled",
    "iid normal",
    "iid sampled",
    *(f"tied {training}" for training in list(SAMPLING)[1:]),
)
VARIANTS = ("plain export", "knot projection", "fine-tune", "distilled")
ARMS = (*SCRATCH, *(f"iid net {v}" for v in VARIANTS), *(f"resnet {v}" for v in VARIANTS))
RESNET = {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.05, "schedule": "cosine"}
DISTILL_LR = {"iid net": 1e-3, "resnet": 1e-4}
"""AdamW learning rates of distill_depth: the ODE-ResNet's weights sit at the ODE scale; the
ResNet's break above 1e-4 (3e-4: 61/75/76% at L, L/2, L/4 after 2 epochs; 1e-3: 29% at L)."""
DISTILL_RECIPE: dict[str, dict[str, Any]] = {
    "iid net": {"lr": 3e-3, "warmup": 0.1, "step_weights": (1, 2, 4)},
    "resnet": {},
}
"""Settings of the ``distilled`` arms over :data:`DISTILL_LR` and distill_depth's defaults. The
iid net: lr 3e-3 with a linear warm-up over the first 10% of the steps, and the losses at
(L, L/2, L/4) weighted 1:2:4, measured (Euler L/2, L/4 − source, test split, seeds 0/1/2) at
−0.0/−1.5/−1.1 and −2.2/−2.2/−4.4 pt against −1.1/−1.9/−1.1 and −3.0/−3.7/−6.7 with lr 1e-3,
equal weights, no warm-up; the ResNet is not measured with them (lr kept at 1e-4)."""


def demo_config() -> dict[str, Any]:
    """Model and data arguments of the demo's config (the schedule the ODE-ResNets train with)."""
    config = yaml.safe_load((CONFIGS / "digits_ode_resnet.yaml").read_text())
    model = {k: v for k, v in config["model"].items() if k not in ("backbone", "backbone_kwargs")}
    return {
        "model": model,
        "backbone": config["model"]["backbone_kwargs"],
        "data": config["data"]["init_args"],
        "epochs": config["trainer"]["max_epochs"],
    }


def digits(seed: int, image_size: int) -> DigitsDataModule:
    config = demo_config()["data"]
    data = DigitsDataModule(**{**config, "image_size": image_size, "seed": seed})
    data.setup("fit")
    return data


def fit(
    backbone: nn.Module,
    data: DigitsDataModule,
    hyper: dict[str, Any],
    epochs: int,
    seed: int,
    callbacks: list[pl.Callback],
) -> tuple[nn.Module, float]:
    """Train ``backbone`` on ``data`` with the classifier's ``hyper`` parameters; eval mode."""
    pl.seed_everything(seed, verbose=False)
    module = ImageClassifier(backbone, num_classes=10, in_channels=1, **hyper)
    trainer = cpu_trainer(max_epochs=epochs, callbacks=callbacks)
    started = time.perf_counter()
    trainer.fit(module, data)
    return module.backbone.eval(), time.perf_counter() - started


def long_resnet() -> nn.Module:
    """``ResNet(BasicBlock, [2, 2, 16, 2])`` with a 1-channel stem and 10 classes."""
    model = ResNet(BasicBlock, [2, 2, 16, 2], num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    return model


class Cache:
    """Trained networks and arm results on disk, so that runs resume and split."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "nets").mkdir(parents=True, exist_ok=True)
        (root / "results").mkdir(parents=True, exist_ok=True)

    def net(self, name: str, seed: int, build, train) -> tuple[nn.Module, dict[str, Any]]:
        """The trained network ``name``: loaded when cached, else built, trained and saved."""
        path = self.root / "nets" / f"{name.replace(' ', '_')}_{seed}.pt"
        model = build()
        if path.is_file():
            state = torch.load(path, weights_only=True)
            model.load_state_dict(state["model"])
            return model.eval(), state["record"]
        model, record = train(model)
        atomic_save({"model": model.state_dict(), "record": record}, path)
        return model.eval(), record

    def result_path(self, arm: str, seed: int) -> Path:
        return self.root / "results" / f"{arm.replace(' ', '_')}_{seed}.json"

    def results(self, seeds: list[int]) -> list[dict[str, Any]]:
        rows = []
        for arm in ARMS:
            for seed in seeds:
                path = self.result_path(arm, seed)
                if path.is_file():
                    rows += json.loads(path.read_text())
        return rows


def scratch_net(
    cache: Cache, init: str, training: str, seed: int, epochs: int | None
) -> tuple[nn.Module, Any, dict]:
    config = demo_config()
    epochs = epochs or config["epochs"]
    data = digits(seed, config["data"]["image_size"])

    def build() -> nn.Module:
        kwargs = {**config["backbone"], "init": init, "seed": seed}
        return ode_resnet(**kwargs, num_classes=10, in_channels=1)

    def train(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        callbacks = []
        if training in SAMPLING:
            options = {"steps": (1.0, 0.5, 0.25), "seed": seed, **SAMPLING[training]}
            callbacks.append(DepthSampling(**options))
        model, seconds = fit(model, data, config["model"], epochs, seed, callbacks)
        return model, {"train_s": seconds, "epochs": epochs}

    model, record = cache.net(f"{init} {training}", seed, build, train)
    return model, data, record


def resnet_net(cache: Cache, seed: int, epochs: int) -> tuple[nn.Module, Any, dict]:
    data = digits(seed, 32)

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return long_resnet()

    def train(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        model, seconds = fit(model, data, RESNET, epochs, seed, [])
        return model, {"train_s": seconds, "epochs": epochs}

    model, record = cache.net("resnet", seed, build, train)
    return model, data, record


def variant(
    source: nn.Module,
    name: str,
    data: Any,
    epochs: int,
    lr: float,
    recipe: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict]:
    """The export of an already-trained ``source`` for one of :data:`VARIANTS`; ``recipe``:
    further distill_depth settings of the ``distilled`` variant (they override ``lr``)."""
    started = time.perf_counter()
    loader = data.train_dataloader()
    if name == "plain export":
        model = export_neural_ode(source)
    elif name == "knot projection":
        depths = [stage.depth for stage in find_stages(source)]
        model = export_neural_ode(source, knots=min(max(2, max(depths) // 2), min(depths)))
    elif name == "fine-tune":
        model = distill_depth(source, loader, steps=(1.0,), epochs=epochs, lr=lr, progress=False)
    else:
        settings = {"lr": lr, **(recipe or {})}
        model = distill_depth(source, loader, epochs=epochs, progress=False, **settings)
    return model, {"variant_s": time.perf_counter() - started}


def measure(
    arm: str, seed: int, source: nn.Module, model: nn.Module, data: Any, args, record: dict
) -> list[dict[str, Any]]:
    """One row per setting: accuracy, field evaluations, latency against the source."""
    data.setup("test")
    batches = list(data.test_dataloader()) * args.passes
    rows = accuracy_vs_steps(model, batches, SETTINGS, reference=source, warmup=2)
    out = []
    for row in rows:
        method, fraction = (None, None) if row["setting"] == "reference" else row["setting"].split()
        out.append(
            {
                "arm": arm,
                "seed": seed,
                "method": method or "source",
                "fraction": None if fraction is None else float(fraction),
                "steps": row["steps"],
                "evaluations": row["evaluations"],
                "accuracy": row["accuracy"],
                "latency_ms": row["latency_ms"],
                "latency_ratio": row["latency_ratio"],
                "parameters": sum(
                    p.numel() for p in (source if method is None else model).parameters()
                ),
                **record,
            }
        )
    return out


def run_arm(arm: str, seed: int, cache: Cache, args) -> None:
    path = cache.result_path(arm, seed)
    if path.is_file():
        return
    print(f"[seed {seed}] {arm}", flush=True)
    if arm in SCRATCH:
        init, training = arm.split(" ", 1)
        source, data, record = scratch_net(cache, init, training, seed, args.epochs)
        model = export_neural_ode(source)
    else:
        kind, name = (
            ("iid net", arm[len("iid net ") :])
            if arm.startswith("iid net")
            else (
                "resnet",
                arm[len("resnet ") :],
            )
        )
        if kind == "iid net":
            source, data, record = scratch_net(cache, "iid", "normal", seed, args.epochs)
        else:
            source, data, record = resnet_net(cache, seed, args.resnet_epochs)
        lr = DISTILL_LR[kind]
        recipe = DISTILL_RECIPE[kind] if name == "distilled" else {}
        model, extra = variant(source, name, data, args.distill_epochs, lr, recipe)
        extra["lr"] = recipe.get("lr", lr)
        extra.update({k: v for k, v in recipe.items() if k != "lr"})
        record = {**record, **extra}
    rows = measure(arm, seed, source, model, data, args, record)
    atomic_write_text(json.dumps(rows, indent=1) + "\n", path)
    for row in rows:
        print(
            f"  {row['method']:>6} {row['fraction'] or '':>6} {100 * row['accuracy']:5.1f}% "
            f"{row['latency_ratio']:.2f}x",
            flush=True,
        )


# ----------------------------------------------------------------------------- report


def _spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{scale * mean:.{digits}f}"
    low, high = scale * min(values), scale * max(values)
    return f"{scale * mean:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def _by(rows, arm, method, fraction=None) -> dict[int, dict[str, Any]]:
    return {
        r["seed"]: r
        for r in rows
        if r["arm"] == arm
        and r["method"] == method
        and (fraction is None or r["fraction"] == fraction)
    }


def summary(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Accuracy (mean and min–max over seeds) per arm and setting; latency ratio means."""
    table = []
    for arm in ARMS:
        source = _by(rows, arm, "source")
        if not source:
            continue
        line = {
            "arm": arm,
            "seeds": str(len(source)),
            "source": _spread([r["accuracy"] for r in source.values()]),
        }
        for method, fraction in SETTINGS:
            found = _by(rows, arm, method, fraction)
            label = f"{'Euler' if method == 'euler' else 'RK4'} {_steps_label(method, fraction)}"
            line[label] = _spread([r["accuracy"] for r in found.values()]) if found else "—"
        for fraction in (0.5, 0.25):
            found = _by(rows, arm, "euler", fraction)
            ratio = [r["latency_ratio"] for r in found.values()]
            line[f"latency Euler {BUDGETS[fraction]}"] = (
                f"{statistics.fmean(ratio):.2f}x" if ratio else "—"
            )
        table.append(line)
    return table


def _steps_label(method: str, fraction: float) -> str:
    if method == "euler":
        return BUDGETS[fraction]
    return f"{BUDGETS[fraction * 4]} evals"


def targets(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The issue's targets: per-seed values, their mean and min–max, met or missed by how much."""
    checks = []

    def add(name: str, values: list[float], bound: float, kind: str, unit: str) -> None:
        if not values:
            return
        mean = statistics.fmean(values)
        met = mean >= bound if kind == ">=" else mean <= bound
        miss = abs(mean - bound)
        scale, fmt = (100.0, ".2f") if unit == "pt" else (1.0, ".3f")
        checks.append(
            {
                "target": name,
                "bound": f"{kind} {scale * bound:{fmt}}{'' if unit == 'pt' else 'x'}",
                "mean (min–max) over seeds": f"{scale * mean:{fmt}} "
                f"({scale * min(values):{fmt}}–{scale * max(values):{fmt}})",
                "verdict": "met"
                if met
                else f"missed by {scale * miss:{fmt}}{' pt' if unit == 'pt' else 'x'}",
            }
        )

    def diff(arm_a, m_a, f_a, arm_b, m_b, f_b, key="accuracy"):
        a, b = _by(rows, arm_a, m_a, f_a), _by(rows, arm_b, m_b, f_b)
        return [a[s][key] - b[s][key] for s in sorted(set(a) & set(b))]

    add(
        "tied sampled: Euler L/4 − its own Euler L",
        diff("tied sampled", "euler", 0.25, "tied sampled", "euler", 1.0),
        -0.01,
        ">=",
        "pt",
    )
    sampled_l4 = _by(rows, "tied sampled", "euler", 0.25)
    sampled_l = _by(rows, "tied sampled", "euler", 1.0)
    ratios = [
        sampled_l4[s]["latency_ms"] / sampled_l[s]["latency_ms"]
        for s in sorted(set(sampled_l4) & set(sampled_l))
    ]
    add("tied sampled: latency Euler L/4 / Euler L", ratios, 0.30, "<=", "x")
    add(
        "tied sampled Euler L − tied normal Euler L",
        diff("tied sampled", "euler", 1.0, "tied normal", "euler", 1.0),
        -0.01,
        ">=",
        "pt",
    )
    for training in list(SAMPLING)[1:]:
        arm = f"tied {training}"
        add(
            f"{arm}: Euler L/4 − its own Euler L",
            diff(arm, "euler", 0.25, arm, "euler", 1.0),
            -0.015,
            ">=",
            "pt",
        )
        add(
            f"{arm}: RK4 at L/4 evaluations − its own Euler L",
            diff(arm, "rk4", 0.0625, arm, "euler", 1.0),
            -0.02,
            ">=",
            "pt",
        )
    add(
        "iid net distilled: Euler L/2 − source",
        diff("iid net distilled", "euler", 0.5, "iid net distilled", "source", None),
        -0.01,
        ">=",
        "pt",
    )
    add(
        "iid net distilled: Euler L/4 − source",
        diff("iid net distilled", "euler", 0.25, "iid net distilled", "source", None),
        -0.03,
        ">=",
        "pt",
    )
    add(
        "resnet distilled: Euler L/2 − source",
        diff("resnet distilled", "euler", 0.5, "resnet distilled", "source", None),
        -0.02,
        ">=",
        "pt",
    )
    latency = [r["latency_ratio"] for r in _by(rows, "resnet distilled", "euler", 0.5).values()]
    add("resnet distilled: latency Euler L/2 / source", latency, 0.65, "<=", "x")
    return checks


def epoch_times(cache: Cache, seed: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of one training epoch of each tied arm of :data:`SAMPLING`, the arms
    interleaved in one process (same data, same initialisation; the order rotated from round
    to round, after one untimed epoch), so that a shared machine's drift falls on all of them
    alike; cached in ``--runs``."""
    path = cache.root / f"epoch_times_{seed}_{rounds}.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = demo_config()
    data = digits(seed, config["data"]["image_size"])

    def epoch(training: str) -> float:
        kwargs = {**config["backbone"], "init": "tied", "seed": seed}
        net = ode_resnet(**kwargs, num_classes=10, in_channels=1)
        options = {"steps": (1.0, 0.5, 0.25), "seed": seed, **SAMPLING[training]}
        sampling = DepthSampling(**options)
        return fit(net, data, config["model"], 1, seed, [sampling])[1]

    epoch("sampled")  # the process's first fit pays one-time costs
    arms = list(SAMPLING)
    times: dict[str, list[float]] = {f"tied {training}": [] for training in arms}
    for round_ in range(rounds):
        for training in arms[round_ % len(arms) :] + arms[: round_ % len(arms)]:
            times[f"tied {training}"].append(epoch(training))
    atomic_write_text(json.dumps(times) + "\n", path)
    return times


def costs(rows: list[dict[str, Any]], epochs: dict[str, list[float]]) -> list[dict[str, str]]:
    """What each DepthSampling option costs at Euler against the Euler-only arm: accuracy at
    L, L/2, L/4 per seed, the whole training's time per seed (arms run in whichever process
    the cache was filled by) and the median epoch of :func:`epoch_times` (interleaved)."""
    table = []
    for training in SAMPLING:
        arm = f"tied {training}"
        sources = _by(rows, arm, "source")
        if not sources:
            continue
        line = {"arm": arm, "seeds": str(len(sources))}
        for fraction in (1.0, 0.5, 0.25):
            a, b = _by(rows, arm, "euler", fraction), _by(rows, "tied sampled", "euler", fraction)
            shared = sorted(set(a) & set(b))
            values = [a[s]["accuracy"] - b[s]["accuracy"] for s in shared]
            line[f"Euler {BUDGETS[fraction]} − sampled (pt)"] = _signed(values) if values else "—"
        base = _by(rows, "tied sampled", "source")
        times = [r["train_s"] for r in sources.values()]
        ratios = [sources[s]["train_s"] / base[s]["train_s"] for s in sources if s in base]
        line["train s"] = _spread(times, scale=1.0, digits=0)
        line["train time / sampled"] = _spread(ratios, scale=1.0, digits=2) if ratios else "—"
        if epochs.get(arm):
            median = statistics.median(epochs[arm])
            line["epoch s (interleaved)"] = f"{median:.1f}"
            line["epoch / sampled"] = f"{median / statistics.median(epochs['tied sampled']):.2f}"
        table.append(line)
    return table


def _signed(values: list[float]) -> str:
    mean, low, high = (100 * v for v in (statistics.fmean(values), min(values), max(values)))
    return f"{mean:+.1f} ({low:+.1f}…{high:+.1f})"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against field evaluations (fraction of L), one panel per group of arms."""
    from matplotlib.figure import Figure

    groups = {
        "trained from scratch": SCRATCH,
        "iid net, already trained": [f"iid net {v}" for v in VARIANTS],
        "ResNet [2, 2, 16, 2], already trained": [f"resnet {v}" for v in VARIANTS],
    }
    measured = {row["arm"] for row in rows}
    groups = {title: arms for title, arms in groups.items() if measured & set(arms)}
    figure = Figure(figsize=(4.5 * len(groups), 4), layout="constrained")
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for axis, (title, arms) in zip(axes, groups.items()):
        for index, arm in enumerate(arms):
            color = f"C{index}"
            for method, style in (("euler", "o-"), ("rk4", "s--")):
                points = []
                for fraction in (0.25, 0.5, 1.0):
                    found = _by(rows, arm, method, fraction / (4 if method == "rk4" else 1))
                    if found:
                        values = [100 * r["accuracy"] for r in found.values()]
                        points.append(
                            (fraction, statistics.fmean(values), min(values), max(values))
                        )
                if points:
                    x, mean, low, high = zip(*points)
                    axis.errorbar(
                        x,
                        mean,
                        yerr=[
                            [m - lo for m, lo in zip(mean, low)],
                            [hi - m for m, hi in zip(mean, high)],
                        ],
                        fmt=style,
                        color=color,
                        capsize=2,
                        label=f"{arm} ({method})" if method == "euler" else None,
                        alpha=1.0 if method == "euler" else 0.5,
                    )
        axis.set_xscale("log", base=2)
        axis.set_xticks([0.25, 0.5, 1.0], ["L/4", "L/2", "L"])
        axis.set_xlabel("field evaluations per stage (solid: Euler, dashed: RK4)")
        axis.set_ylabel("test accuracy (%), mean and min–max over seeds")
        axis.set_ylim(0, 100)
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, loc="lower right")
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def _recipe(kind: str) -> str:
    items = DISTILL_RECIPE[kind].items()
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)


def _options() -> str:
    described = []
    for training, options in SAMPLING.items():
        items = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in options.items())
        described.append(f"{training}: {items or 'Euler only'}")
    return "; ".join(described)


def report(cache: Cache, seeds: list[int], args) -> None:
    rows = cache.results(seeds)
    if not rows:
        print("no cached results yet")
        return
    env = environment("cpu")
    RESULTS.mkdir(exist_ok=True)
    timed = cache.root / f"epoch_times_{seeds[0]}_{args.timing_rounds}.json"
    epochs = json.loads(timed.read_text()) if timed.is_file() else {}
    table, checks, cost = summary(rows), targets(rows), costs(rows, epochs)
    content = {
        "environment": env,
        "seeds": seeds,
        "rows": rows,
        "targets": checks,
        "costs": cost,
        "epoch_times": epochs,
    }
    atomic_write_text(
        json.dumps(content, indent=1) + "\n",
        RESULTS / f"{args.output}.json",
    )
    plot(rows, RESULTS / f"{args.output}.png")
    header = ", ".join(f"{k} {v}" for k, v in env.items())
    train = {}
    for row in rows:
        if row["method"] == "source" and "train_s" in row:
            train.setdefault(row["arm"].split(" normal")[0], []).append(row["train_s"])
    text = (
        "## Accuracy (%) on the test split: mean (min–max) over seeds\n\n"
        + markdown_table(table, list(table[0]))
        + "\n## Targets of the issue\n\n"
        + (markdown_table(checks, list(checks[0])) if checks else "none measured yet\n")
        + (
            "\n## What each DepthSampling option costs at Euler (against tied sampled)\n\n"
            + markdown_table(cost, list(cost[0]))
            if cost
            else ""
        )
        + f"\n{header}\n\n"
        + f"Test split of digits (270 images per seed; the split follows the seed), batches of 64; "
        f"latency: median over {args.passes} interleaved passes of the test split (4 full "
        f"batches each, 2 warm-up batches), ratio to the source network timed alongside. "
        f"RK4 columns: the same field evaluations as Euler at L, L/2, L/4 (L/4, L/8, L/16 RK4 "
        f"steps, at least one per stage). ode_resnet arms: "
        f"{args.epochs or demo_config()['epochs']} epochs of "
        f"the demo's SGD schedule; ResNet: {args.resnet_epochs} epochs of AdamW; distillation: "
        f"{args.distill_epochs} epochs, AdamW at lr {DISTILL_LR['iid net']:g} (iid net) and "
        f"{DISTILL_LR['resnet']:g} (ResNet); iid net distilled: {_recipe('iid net')}. "
        f"Sampled arms: DepthSampling(steps=(1.0, 0.5, 0.25)), each pass's loss the "
        f"cross-entropy on the labels (the default), with {_options()}. "
        f"Training time: 'train s' is each whole training (15 epochs), run while other "
        f"processes shared the machine, so noisy; 'epoch s' is the median of "
        f"{args.timing_rounds} one-epoch fits per arm on seed {seeds[0]}, the arms "
        f"interleaved in one process after an untimed fit. "
        f"1 CPU thread, shared machine.\n"
    )
    atomic_write_text(text, RESULTS / f"{args.output}.md")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_anytime"))
    parser.add_argument("--epochs", type=int, help="epochs of the ODE-ResNets (config: 15)")
    parser.add_argument("--resnet-epochs", type=int, default=6)
    parser.add_argument("--distill-epochs", type=int, default=5)
    parser.add_argument("--passes", type=int, default=5, help="timed passes over the test split")
    parser.add_argument(
        "--timing-rounds",
        type=int,
        default=3,
        help="interleaved one-epoch timings of the tied DepthSampling arms, on the first seed "
        "(0: none)",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--output", default="anytime", help="results/OUTPUT.{json,md,png} (default anytime)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cache = Cache(args.runs)
    if not args.report_only:
        for seed in args.seeds:
            for arm in args.arms:
                run_arm(arm, seed, cache, args)
        if args.timing_rounds and any(arm.startswith("tied sampled") for arm in args.arms):
            epoch_times(cache, args.seeds[0], args.timing_rounds)
    report(cache, args.seeds, args)


if __name__ == "__main__":
    main()
