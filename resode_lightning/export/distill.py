"""Depth distillation: a trained ResNet made into a neural ODE that runs at any step count.

The source is exported with its BatchNorm folded (nothing left in the stages depends on batch
statistics, so every step count computes with the same weights) and, optionally, its weight
path fitted at fewer knots. The export is then fine-tuned at every step count of a set on
every batch (the mean of their losses, optionally weighted), towards the source's outputs
(KL divergence to its softened logits) and the labels: depth sampling with the expectation
over the set taken exactly, which measured better than one count drawn per batch at equal
epochs. Progress is checkpointed atomically after every epoch; a run started again with the
same checkpoint path resumes from it, once every field of the file is validated. A run whose
loss or weights turn NaN or inf stops with an error naming the epoch and batch, and writes
nothing.
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

from resode_lightning.core.budget import check_steps
from resode_lightning.core.io.atomic import atomic_save, writable_target
from resode_lightning.core.io.checkpoint import safe_torch_load
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.export.anytime import resolve_steps, set_steps
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.options import ExportOptions
from resode_lightning.export.solve import NeuralODEStage

CHECKPOINT_FORMAT = "resode-depth-distillation/1"
MAX_LR = 1.0
"""The largest peak learning rate accepted: AdamW moves every weight by up to ``lr`` per step,
so larger rates only diverge."""
MAX_STEP_COUNT = 2**24
"""The most optimizer steps a resumed AdamW state may record (counts stay exact in float32)."""
_ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})


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
        lr: peak learning rate of AdamW (cosine schedule to 0 over all steps), in
            ``(0, MAX_LR]``. The default
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
        checkpoint: file to write after every epoch and to resume from when it exists (its
            directory is checked to be writable before training).
        device: where to train (default: the source's device).
        progress: show a progress bar (tqdm) per epoch.

    Returns:
        The fine-tuned export in eval mode, at the full depth of every stage; save it with
        :func:`~resode_lightning.save_neural_ode`, choose a budget with ``set_steps``.

    Raises:
        ValueError: an argument out of range; ``options`` with an adaptive method; ``source``
            holds NaN or inf; the loss or the weights turned NaN or inf during training (the
            message names the epoch and batch; ``checkpoint`` is left as it was).
        CheckpointError: ``checkpoint`` exists but is damaged, forged or was written for other
            settings (the message names the file and the differences).
        OSError: ``checkpoint`` cannot be written (see
            :func:`~resode_lightning.core.io.atomic.writable_target`).
    """
    check_settings(steps, step_weights, epochs, lr, warmup, weight_decay, temperature, label_weight)
    if checkpoint is not None:
        writable_target(checkpoint)
    options = (options or ExportOptions(gradient="backprop")).replace(knots=knots)
    if options.steps is not None or options.method not in GRID_METHODS:
        raise ValueError(
            f"distill_depth fine-tunes a fixed-grid export ({', '.join(GRID_METHODS)}) at each "
            "stage's depth: leave options.steps at None"
        )
    device = torch.device(device) if device is not None else _device(source)
    teacher = source.to(device).eval()
    poisoned = _first_non_finite(teacher.state_dict().items())
    if poisoned is not None:
        raise ValueError(
            f"the source's {poisoned!r} holds NaN or inf values, so every output distilled from "
            f"it would too; use finite weights"
        )
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
    per_epoch = _length(loader)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = _resume(checkpoint, settings, student, optimizer, epochs)
    schedule = _Cosine(epochs * per_epoch, warmup)  # rebuilt at the resumed step, not read
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, start * per_epoch - 1)
    kept = f" ({checkpoint} keeps the last epoch finished)" if checkpoint is not None else ""
    for epoch in range(start, epochs):
        student.eval()  # norms outside the stages keep their running statistics
        batches = _progress(loader, f"distill epoch {epoch + 1}/{epochs}", progress)
        for number, batch in enumerate(batches, 1):
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
            if not math.isfinite(float(total)):
                raise _diverged(
                    f"epoch {epoch + 1}/{epochs}, batch {number}/{per_epoch}",
                    f"the loss is {float(total)}",
                    kept,
                )
            optimizer.step()
            scheduler.step()
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{float(total):.3f}", refresh=False)
        set_steps(student, 1.0)
        poisoned = _first_non_finite(_trained_tensors(student, optimizer))
        if poisoned is not None:
            raise _diverged(
                f"the end of epoch {epoch + 1}/{epochs}", f"{poisoned} holds NaN or inf", kept
            )
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
    epochs: int,
) -> int:
    """Load a distillation checkpoint into ``student`` and ``optimizer``; returns the epochs it
    completed.

    The file is read by :func:`~resode_lightning.core.io.checkpoint.safe_torch_load` and every
    field used is validated before anything is loaded: ``settings`` must equal this run's, ``epoch``
    lie in ``[0, epochs]``, ``model`` match the student's names, shapes and dtypes, and
    ``optimizer`` hold AdamW moments of the parameters' shapes and step counts; no tensor may
    hold NaN or inf. The optimizer's hyper-parameters and the learning-rate schedule are not
    read: they follow from the (matching) settings and the epoch.

    Raises:
        CheckpointError: the file is unreadable, damaged, forged or written for other settings;
            the message names it and what is wrong.
    """
    path = Path(path)
    state = safe_torch_load(path)
    if not isinstance(state, dict) or _field(state, "format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a distillation checkpoint ({CHECKPOINT_FORMAT})")
    missing = [key for key in ("settings", "epoch", "model", "optimizer") if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(map(repr, missing))}: it is damaged; remove it to start over"
        )
    _check_recorded_settings(path, state["settings"], settings)
    epoch = state["epoch"]
    if type(epoch) is not int or not 0 <= epoch <= epochs:
        raise CheckpointError(
            f"{path} records {_short(epoch)} epochs done; it must be an int in [0, {epochs}]: "
            f"the file is damaged, remove it to start over"
        )
    model = _model_state(path, state["model"], student.state_dict())
    _check_grids(path, model, student)
    moments = _optimizer_state(path, state["optimizer"], optimizer)
    student.load_state_dict(model)
    optimizer.load_state_dict(moments)
    return epoch


def _field(state: dict[Any, Any], key: str) -> str | None:
    """``state[key]`` when it is a string, else ``None``."""
    value = state.get(key)
    return value if isinstance(value, str) else None


def _short(value: object, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, for messages about hostile values."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= width else f"{text[: width - 3]}..."


def _check_recorded_settings(path: Path, recorded: object, settings: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` unless ``recorded`` (the checkpoint's JSON text) holds
    ``settings``; the message names every difference."""
    current = json.loads(json.dumps(settings))
    try:
        if not isinstance(recorded, str):
            raise ValueError(f"it is {type(recorded).__name__}, not JSON text")
        found = json.loads(recorded)
        if not isinstance(found, dict):
            raise ValueError(f"it holds {type(found).__name__}, not a JSON object")
        differences = [
            f"{key} {_short(found.get(key, 'absent'), 30)} recorded, "
            f"{_short(current.get(key, 'absent'), 30)} now"
            for key in sorted(set(found) | set(current))
            if key not in found or key not in current or found[key] != current[key]
        ]
    except (ValueError, RecursionError) as error:
        raise CheckpointError(
            f"{path}: its 'settings' are unreadable ({_short(str(error))}); the file is damaged, "
            f"remove it to start over"
        ) from None
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise CheckpointError(
            f"{path} was written by a distillation with other settings ({shown}); rerun with "
            f"the recorded settings, or remove it or use another checkpoint path"
        )


def _model_state(path: Path, found: object, expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's ``model`` once checked to hold exactly ``expected``'s names, each a
    finite tensor of the same shape and dtype."""
    if not isinstance(found, dict):
        raise CheckpointError(
            f"{path}: 'model' holds {type(found).__name__}, not the student's state dict"
        )
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(map(repr, set(found) - set(expected)))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: 'model' does not match the student (another source or options?): "
            f"missing {missing[:5]}, unexpected [{', '.join(unexpected[:5])}]"
        )
    return {
        key: _checked_tensor(path, f"model[{key!r}]", found[key], like)
        for key, like in expected.items()
    }


def _check_grids(path: Path, model: dict[str, Tensor], student: nn.Module) -> None:
    """Refuse horizons or knot times of ``model`` that no export has (as
    :func:`~resode_lightning.load_neural_ode` does): a positive horizon per stage, knot times
    increasing in ``[0, horizon]``."""
    for name, stage in student.named_modules():
        if not isinstance(stage, NeuralODEStage):
            continue
        prefix = f"{name}." if name else ""
        horizon = float(model[f"{prefix}horizon"])
        times = model[f"{prefix}field.path.times"].reshape(-1)
        ordered = times.numel() > 0 and bool((times[1:] > times[:-1]).all())
        if not (horizon > 0 and ordered and times[0] >= 0 and times[-1] <= horizon):
            raise CheckpointError(
                f"{path}: stage {name!r} has horizon {horizon:g} and knot times "
                f"{_short(times.tolist())}; an export has a positive horizon and increasing "
                f"times in [0, horizon]"
            )


def _optimizer_state(path: Path, found: object, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state to load into the fresh AdamW ``optimizer``: its own parameter groups (with
    ``initial_lr`` for the rebuilt schedule) and the checkpoint's moments and step counts,
    each checked against its parameter."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    entries = found.get("state") if isinstance(found, dict) else None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: 'optimizer' holds no AdamW state (a dict with 'state')")
    state = {}
    for index, entry in entries.items():
        if type(index) is not int or not 0 <= index < len(parameters):
            raise CheckpointError(
                f"{path}: the optimizer state names parameter {_short(index)}; the student has "
                f"{len(parameters)} (0 to {len(parameters) - 1})"
            )
        if not isinstance(entry, dict) or set(entry) != _ADAM_STATE:
            raise CheckpointError(
                f"{path}: the optimizer state of parameter {index} must hold exactly "
                f"{', '.join(sorted(_ADAM_STATE))}; found {_short(entry)}"
            )
        name = f"the optimizer's {{}} of parameter {index}"
        like = parameters[index].detach()
        squares = _checked_tensor(path, name.format("exp_avg_sq"), entry["exp_avg_sq"], like)
        if bool((squares < 0).any()):
            raise CheckpointError(f"{path}: {name.format('exp_avg_sq')} holds negative values")
        state[index] = {
            "step": torch.tensor(_step_count(path, name.format("step"), entry["step"])),
            "exp_avg": _checked_tensor(path, name.format("exp_avg"), entry["exp_avg"], like),
            "exp_avg_sq": squares,
        }
    groups = [
        {**group, "initial_lr": group["lr"]} for group in optimizer.state_dict()["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _checked_tensor(path: Path, name: str, value: object, like: Tensor) -> Tensor:
    """``value`` detached, once checked to be a tensor of ``like``'s shape and dtype holding no
    NaN or inf."""
    if not isinstance(value, Tensor):
        found = type(value).__name__
    elif value.shape != like.shape or value.dtype != like.dtype:
        found = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(
            f"{path}: {name} holds NaN or inf (the run it records had diverged); remove the "
            f"file to start over"
        )
    else:
        return value.detach()
    raise CheckpointError(
        f"{path}: {name} must be a {like.dtype} tensor of shape {tuple(like.shape)}, found {found}"
    )


def _step_count(path: Path, name: str, value: object) -> float:
    """An AdamW step count: a whole number in ``[1, MAX_STEP_COUNT]`` (0 would divide by 0)."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype.is_floating_point:
        count = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        count = float(value) if abs(value) <= MAX_STEP_COUNT else math.inf
    else:
        count = math.nan
    if not (count.is_integer() and 1 <= count <= MAX_STEP_COUNT):
        raise CheckpointError(
            f"{path}: {name} is {_short(value)}; a step count is a whole number in "
            f"[1, {MAX_STEP_COUNT:,}]"
        )
    return count


def _first_non_finite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating-point tensor of ``named`` that holds NaN or inf."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _trained_tensors(
    student: nn.Module, optimizer: torch.optim.Optimizer
) -> Iterable[tuple[str, Tensor]]:
    """The student's state and the optimizer's moments, by name."""
    for key, value in student.state_dict().items():
        yield f"the student's {key!r}", value
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                yield f"the optimizer's {key} of parameter {index}", value


def _diverged(where: str, what: str, kept: str) -> ValueError:
    """The error of a run whose loss or weights turned NaN or inf at ``where``."""
    return ValueError(
        f"distillation diverged at {where}: {what}; stopped before writing this epoch{kept}; "
        f"lower the learning rate or add a warm-up, and check the data for NaN or inf"
    )


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


def check_settings(
    steps: Sequence[float | int],
    step_weights: Sequence[float] | None,
    epochs: int,
    lr: float,
    warmup: float,
    weight_decay: float,
    temperature: float,
    label_weight: float,
) -> None:
    """Raise ``ValueError`` naming the first argument of :func:`distill_depth` out of range.

    Every number must be finite: ``lr`` in ``(0, MAX_LR]``, ``warmup`` in ``[0, 1)``,
    ``weight_decay >= 0``, ``temperature > 0``, ``label_weight`` in ``[0, 1]``, ``epochs`` a
    positive int, ``steps`` valid budgets, ``step_weights`` one weight >= 0 per step count,
    not all 0.
    """
    if not steps:
        raise ValueError("steps must name at least one step count")
    for budget in steps:
        check_steps(budget)
    if step_weights is not None and (
        len(step_weights) != len(steps)
        or not all(_real(w) and w >= 0 for w in step_weights)
        or not sum(step_weights) > 0
    ):
        raise ValueError(
            f"step_weights must give one finite weight >= 0 per step count (not all 0), got "
            f"{step_weights!r} for steps {steps!r}"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    checks = (
        ("lr", lr, f"in (0, {MAX_LR:g}]", lambda x: 0 < x <= MAX_LR),
        ("warmup", warmup, "a share of the steps in [0, 1)", lambda x: 0 <= x < 1),
        ("weight_decay", weight_decay, ">= 0", lambda x: x >= 0),
        ("temperature", temperature, "> 0", lambda x: x > 0),
        ("label_weight", label_weight, "in [0, 1]", lambda x: 0 <= x <= 1),
    )
    for name, value, expected, accepts in checks:
        if not (_real(value) and accepts(value)):
            raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


def _real(value: object) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)
