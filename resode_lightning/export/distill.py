"""Depth distillation: a trained ResNet made into a neural ODE that runs at any step count.

The source is exported with its BatchNorm folded (nothing left in the stages depends on batch
statistics, so every step count computes with the same weights) and, optionally, its weight
path fitted at fewer knots. The export is then fine-tuned at every step count of a set on
every batch (the mean of their losses, optionally weighted), towards the source's outputs
(KL divergence to its softened logits) and the labels: depth sampling with the expectation
over the set taken exactly, which measured better than one count drawn per batch at equal
epochs. Progress is checkpointed atomically after every epoch; a run started again with the
same checkpoint path resumes from it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resode_lightning.core.files import CheckpointError, atomic_save
from resode_lightning.export.anytime import resolve_steps, set_steps
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.options import ExportOptions

CHECKPOINT_FORMAT = "resode-depth-distillation/1"


def distill_depth(
    source: nn.Module,
    loader: Iterable[Any],
    *,
    steps: Sequence[float | int] = (1.0, 0.5, 0.25),
    step_weights: Sequence[float] | None = None,
    epochs: int = 5,
    knots: int | None = None,
    lr: float = 1e-4,
    warmup: float = 0.0,
    weight_decay: float = 0.0,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    options: ExportOptions | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> nn.Module:
    """A neural ODE export of ``source`` fine-tuned to be right at every step count of ``steps``.

    Args:
        source: the trained network (torchvision, timm, ``ode_resnet`` or any model with
            registered blocks), in eval mode; it is not modified.
        loader: training batches ``(images, labels, ...)``.
        steps: the step counts trained, each on every batch, for every stage: fractions of
            each stage's depth (``1.0, 0.5, 0.25``) or ints (see
            :func:`~resode_lightning.export.anytime.set_steps`). ``(1.0,)`` fine-tunes at full
            depth only.
        step_weights: the weight of each count's loss, in the order of ``steps`` (normalised
            to sum 1; ``None``: equal). On the digits benchmark's ODE-ResNet (one stage of 16
            blocks), ``(1, 2, 4)`` at ``(1.0, 0.5, 0.25)`` with ``lr=3e-3, warmup=0.1``
            measured closest to the source at L/2 and L/4 (see ``benchmarks/anytime.py``);
            not measured on production ResNets, hence not the default.
        epochs: passes over ``loader``.
        knots: fit each stage's weight path at this many knots first (``None``: one per block).
        lr: peak learning rate of AdamW (cosine schedule to 0 over all steps). The default
            suits production ResNets (measured on a torchvision ResNet: 1e-4 keeps it, 3e-4 and
            above break it); small ODE-ResNets trained from scratch in ODE form, whose weights
            sit at the larger ODE scale, take 1e-3 to 3e-3.
        warmup: share of all steps over which the learning rate rises linearly from
            ``lr / (warmup steps)`` to ``lr`` before the cosine decay (0: none; the
            benchmark's ODE-ResNet takes lr 3e-3 with 0.1, where lr 3e-3 alone did no better
            than 1e-3).
        weight_decay: AdamW's decoupled weight decay.
        temperature: softening of both logits in the distillation term.
        label_weight: weight of the cross-entropy on the labels; the distillation term has
            ``1 - label_weight``.
        options: export options (default: Euler, linear path, BatchNorm folded, backprop).
        checkpoint: file to write after every epoch and to resume from when it exists.
        device: where to train (default: the source's device).
        progress: show a progress bar (tqdm) per epoch.

    Returns:
        The fine-tuned export in eval mode, at the full depth of every stage; save it with
        :func:`~resode_lightning.save_neural_ode`, choose a budget with ``set_steps``.

    Raises:
        ValueError: an argument out of range; ``options`` with an adaptive method.
        CheckpointError: ``checkpoint`` exists but was written for other settings.
    """
    _check(steps, step_weights, epochs, lr, warmup, weight_decay, temperature, label_weight)
    options = (options or ExportOptions(gradient="backprop")).replace(knots=knots)
    if options.steps is not None or options.method not in ("euler", "midpoint", "rk4"):
        raise ValueError(
            "distill_depth fine-tunes a fixed-grid export (euler, midpoint or rk4) at each "
            "stage's depth: leave options.steps at None"
        )
    device = torch.device(device) if device is not None else _device(source)
    teacher = source.to(device).eval()
    student = export_neural_ode(teacher, options).to(device)
    for budget in steps:
        resolve_steps(student, budget)
    settings = {
        "steps": list(steps),
        "epochs": epochs,
        "knots": knots,
        "lr": lr,
        "weight_decay": weight_decay,
        "temperature": temperature,
        "label_weight": label_weight,
        "options": options.to_config(),
    }
    # only when set, so that checkpoints written before these options existed still resume
    if step_weights is not None:
        settings["step_weights"] = [float(w) for w in step_weights]
    if warmup:
        settings["warmup"] = warmup
    shares = [float(w) / sum(step_weights) for w in step_weights] if step_weights else None
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    total = epochs * _length(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Cosine(total, warmup))
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = _resume(checkpoint, settings, student, optimizer, scheduler)
    for epoch in range(start, epochs):
        student.eval()  # norms outside the stages keep their running statistics
        batches = _progress(loader, f"distill epoch {epoch + 1}/{epochs}", progress)
        for batch in batches:
            images, labels = batch[0].to(device), batch[1].to(device)
            with torch.no_grad():
                target = teacher(images)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for index, budget in enumerate(steps):  # every count on every batch: weighted mean
                set_steps(student, budget)
                logits = student(images)
                loss = distillation_loss(logits, target, labels, temperature, label_weight)
                loss = loss / len(steps) if shares is None else loss * shares[index]
                loss.backward()
                total += loss.detach()
            optimizer.step()
            scheduler.step()
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{float(total):.3f}", refresh=False)
        set_steps(student, 1.0)
        if checkpoint is not None:
            state = {
                "format": CHECKPOINT_FORMAT,
                "settings": json.dumps(settings, sort_keys=True),
                "epoch": epoch + 1,
                "model": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
            atomic_save(state, checkpoint)
    set_steps(student, 1.0)
    return student.eval()


def distillation_loss(
    logits: Tensor, target: Tensor, labels: Tensor, temperature: float, label_weight: float
) -> Tensor:
    """``label_weight * CE(logits, labels) + (1 - label_weight) * T² KL(target_T || logits_T)``
    with both logits divided by ``T``."""
    soft = F.kl_div(
        F.log_softmax(logits / temperature, dim=-1),
        F.log_softmax(target / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    hard = F.cross_entropy(logits, labels)
    return label_weight * hard + (1 - label_weight) * temperature**2 * soft


class _Cosine:
    """Learning-rate factor: linear warm-up over the first ``warmup`` share of ``total`` steps,
    then cosine from 1 to 0 over the rest (picklable)."""

    def __init__(self, total: int, warmup: float = 0.0) -> None:
        self.total = max(1, total)
        self.warmup = min(round(warmup * self.total), self.total - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay = self.total - self.warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - self.warmup, decay) / decay))


def _resume(
    path: str | os.PathLike,
    settings: dict[str, Any],
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Load a distillation checkpoint into the run; returns the epochs it completed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise CheckpointError(
            f"{path} is not a readable distillation checkpoint: {error}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a distillation checkpoint ({CHECKPOINT_FORMAT})")
    if json.loads(state["settings"]) != json.loads(json.dumps(settings)):
        raise CheckpointError(
            f"{path} was written by a distillation with other settings: "
            f"{state['settings']}; remove it or use another checkpoint path"
        )
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])


def _progress(loader: Iterable[Any], description: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, leave=False, dynamic_ncols=True)


def _length(loader: Iterable[Any]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("distill_depth needs a loader with a length (a DataLoader)") from None


def _device(model: nn.Module) -> torch.device:
    reference = next(iter(model.parameters()), None)
    return reference.device if reference is not None else torch.device("cpu")


def _check(
    steps: Sequence[float | int],
    step_weights: Sequence[float] | None,
    epochs: int,
    lr: float,
    warmup: float,
    weight_decay: float,
    temperature: float,
    label_weight: float,
) -> None:
    if not steps:
        raise ValueError("steps must name at least one step count")
    if step_weights is not None and (
        len(step_weights) != len(steps)
        or any(not w >= 0 for w in step_weights)
        or not sum(step_weights) > 0
    ):
        raise ValueError(
            f"step_weights must give one weight >= 0 per step count (not all 0), got "
            f"{step_weights!r} for steps {steps!r}"
        )
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a share of the steps in [0, 1), got {warmup!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not (lr > 0 and weight_decay >= 0 and temperature > 0 and 0 <= label_weight <= 1):
        raise ValueError(
            f"need lr > 0, weight_decay >= 0, temperature > 0 and 0 <= label_weight <= 1, got "
            f"{lr!r}, {weight_decay!r}, {temperature!r}, {label_weight!r}"
        )
