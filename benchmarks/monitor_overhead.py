"""Training step time of resnet50 with and without SmoothnessMonitor.

Arms in a real Lightning Trainer on one fixed random batch (resnet50, batch 16, SGD,
cross-entropy, one CPU thread): no monitor, the monitor at its default interval (the Trainer's
``log_every_n_steps``), every step with its defaults (per-parameter metrics on) and every step
with ``per_parameter=False``. Arms are interleaved over ``--rounds`` to share the machine's
drift; an arm's step time is the median interval between consecutive ``on_train_batch_start``
calls after ``--warmup`` steps (the monitor's own hook falls inside it), and its ratio the
median over rounds of its step time over the no-monitor arm's of the same round. Two figures
less exposed to a shared machine's noise: the time spent inside the monitor's training hooks
(median per step, every-step arm), as a ratio ``1 + hook / step``, and one measurement of all
of resnet50's stages (the metric kernels, no logging). When fewer steps than the default
interval are run, the default-interval ratio is derived from the every-step cost and marked
so. Writes results/monitor_overhead{_cuda}.{json,md}.

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
from resode_lightning.core.metrics import metric_table
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.core.parameters import stage_tensors

BATCH = 16
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


class _TimedMonitor(SmoothnessMonitor):
    """The monitor, with the seconds spent in its per-step training hook recorded."""

    def __init__(self, device: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.device = device
        self.hook_seconds: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.hook_seconds.append(time.perf_counter() - started)


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
    return statistics.median(intervals)


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
    parser.add_argument("--steps", type=int, help="timed steps per arm and round (cpu 8, cuda 200)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, help="image size (cpu 64, cuda 224)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    torch.set_num_threads(1)
    steps = args.steps or (200 if cuda else 8)
    size = args.size or (224 if cuda else 64)
    arms = {
        "none": lambda: None,
        "default interval": lambda: SmoothnessMonitor(plot=False),
        "every step": lambda: _TimedMonitor(args.device, every_n_steps=1, plot=False),
        "every step, per_parameter=False": lambda: SmoothnessMonitor(
            every_n_steps=1, per_parameter=False, plot=False
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    hook_seconds: list[float] = []
    names = list(arms)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            monitor = arms[name]()
            times[name].append(step_time(args.device, size, steps, args.warmup, monitor))
            if isinstance(monitor, _TimedMonitor):
                hook_seconds += monitor.hook_seconds[args.warmup :]
            print(f"round {round_index}: {name}: {times[name][-1] * 1e3:.1f} ms/step", flush=True)
    base = statistics.median(times["none"])
    kernels = metric_time(args.device)
    hook = statistics.median(hook_seconds)
    rows = []
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, times["none"], strict=True))
        rows.append(
            {
                "monitor": name,
                "step (ms)": f"{statistics.median(values) * 1e3:.1f}",
                "per round (ms)": " ".join(f"{v * 1e3:.1f}" for v in values),
                "ratio to none": f"{ratio:.3f}",
            }
        )
    rows[2]["ratio to none"] += f" (hook time: {1 + hook / base:.4f})"
    every = statistics.median(times["every step"]) - base
    if steps < INTERVAL:
        rows[1]["ratio to none"] += f" (derived: {1 + every / INTERVAL / base:.4f})"
    for row in rows:
        print(row)
    notes = (
        f"resnet50, batch {BATCH}, {size}x{size}, SGD momentum, one thread, {args.rounds} "
        f"interleaved rounds of {steps} timed steps per arm after {args.warmup} warm-up steps "
        f"(step: median interval; ratio: median over rounds of the same round's ratio); default "
        f"interval = log_every_n_steps = {INTERVAL}. Time inside the monitor's training hook, "
        f"every step: median {hook * 1e3:.2f} ms per step. One measurement of the 4 stages' "
        f"metric kernels alone: {kernels * 1e3:.2f} ms. Target: <= 1.05 every step with the "
        f"defaults (per-parameter on)."
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
