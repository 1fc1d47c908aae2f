"""Training step time of resnet50 with and without SmoothnessMonitor.

Three arms in a real Lightning Trainer on one fixed random batch (SGD, cross-entropy):
no monitor, the monitor at its default interval (the Trainer's ``log_every_n_steps``) and
the monitor every step. Arms are interleaved over ``--rounds`` to share the machine's drift;
the step time is the mean interval between consecutive ``on_train_batch_start`` calls after
``--warmup`` steps (the monitor's own hook falls inside it). Also timed alone: one
measurement of all of resnet50's stages (the metric kernels, no logging). When fewer steps
than the default interval are run, the default-interval ratio is derived from the every-step
cost and marked so. Writes results/monitor_overhead{_cuda}.{json,md}.

    python benchmarks/monitor_overhead.py [--device cpu|cuda] [--steps N] [--size PX]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from _common import environment, write_results
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from resode_lightning import SmoothnessMonitor, find_stages
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.core.odeform import stage_tensors
from resode_lightning.core.smoothness import metric_table

BATCH = 32
INTERVAL = 50


class _SameBatch(IterableDataset):
    def __init__(self, size: int, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, 3, size, size, generator=generator)
        self.y = torch.randint(0, 1000, (BATCH,), generator=generator)
        self.count = count

    def __iter__(self):
        for _ in range(self.count):
            yield self.x, self.y


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torchvision_resnet("resnet50")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class _StepClock(pl.Callback):
    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def step_time(
    device: str, size: int, steps: int, warmup: int, monitor: SmoothnessMonitor | None
) -> float:
    clock = _StepClock(device)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=warmup + steps + 1,
        log_every_n_steps=INTERVAL,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[c for c in (clock, monitor) if c is not None],
    )
    data = DataLoader(_SameBatch(size, warmup + steps + 1), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Classifier(), data)
    intervals = [
        b - a for a, b in zip(clock.times[warmup:], clock.times[warmup + 1 :], strict=False)
    ]
    return statistics.fmean(intervals)


def metric_time(device: str, repeats: int = 20) -> float:
    """Seconds for one measurement of every stage of resnet50 (metric kernels only)."""
    stages = find_stages(torchvision_resnet("resnet50").to(device))
    inputs = [stage_tensors(stage) for stage in stages]
    for _ in range(3):
        [metric_table(*args) for args in inputs]
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        [metric_table(*args) for args in inputs]
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, help="timed steps per arm and round (cpu 6, cuda 200)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--size", type=int, help="image size (cpu 64, cuda 224)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    steps = args.steps or (200 if cuda else 6)
    size = args.size or (224 if cuda else 64)
    arms = {
        "none": lambda: None,
        "default interval": lambda: SmoothnessMonitor(plot=False),
        "every step": lambda: SmoothnessMonitor(every_n_steps=1, plot=False),
        "every step, per_parameter=False": lambda: SmoothnessMonitor(
            every_n_steps=1, per_parameter=False, plot=False
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(args.rounds):
        for name, make in arms.items():
            times[name].append(step_time(args.device, size, steps, args.warmup, make()))
            print(f"round {round_index}: {name}: {times[name][-1] * 1e3:.1f} ms/step", flush=True)
    base = statistics.fmean(times["none"])
    kernels = metric_time(args.device)
    rows = []
    for name, values in times.items():
        mean = statistics.fmean(values)
        rows.append(
            {
                "monitor": name,
                "step (ms)": f"{mean * 1e3:.1f}",
                "per round (ms)": " ".join(f"{v * 1e3:.1f}" for v in values),
                "ratio to none": f"{mean / base:.3f}",
            }
        )
    every = statistics.fmean(times["every step"]) - base
    if steps < INTERVAL:
        rows[1]["ratio to none"] += f" (derived: {1 + every / INTERVAL / base:.4f})"
    for row in rows:
        print(row)
    notes = (
        f"resnet50, batch {BATCH}, {size}x{size}, SGD momentum, {args.rounds} interleaved rounds "
        f"of "
        f"{steps} timed steps per arm after {args.warmup} warm-up steps; default interval = "
        f"log_every_n_steps = {INTERVAL}. One measurement of the 4 stages' metric kernels alone: "
        f"{kernels * 1e3:.2f} ms. Targets: <= 1.02 at the default interval, <= 1.10 every step."
        + (
            f" With {steps} < {INTERVAL} steps the default-interval arm runs no measurement; its "
            f"derived ratio is 1 + (every-step cost) / {INTERVAL} / (step time)."
            if steps < INTERVAL
            else ""
        )
    )
    name = "monitor_overhead_cuda" if cuda else "monitor_overhead"
    path = write_results(name, environment(args.device), rows, list(rows[0]), notes=notes)
    print(notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
