"""Depth distillation, the part free of Lightning: its settings, its student, its loss, its
learning-rate schedule and the checks of a checkpoint it resumes from.

:func:`~resode_lightning.distill_depth` (in :mod:`resode_lightning.lit.distillation`) trains the
student on a Lightning ``Trainer``; everything here is plain PyTorch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resode_lightning.core.budget import check_steps
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.export.anytime import resolve_steps
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.options import ExportOptions
from resode_lightning.export.solve import NeuralODEStage

CHECKPOINT_FORMAT = "resode-depth-distillation/2"
"""The ``format`` a distillation records in its Lightning checkpoints (``/1``: the files of the
hand-written loop before it, not resumed)."""
MAX_LR = 1.0
"""The largest peak learning rate accepted: AdamW moves every weight by up to ``lr`` per step,
so larger rates only diverge."""
MAX_STEP_COUNT = 2**24
"""The most optimizer steps a resumed AdamW state may record (counts stay exact in float32)."""
_ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})
_PREFIX = "student."
"""Where the student's tensors sit in the Lightning module's state dict."""


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
    """Raise ``ValueError`` naming the first argument of ``distill_depth`` out of range.

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


def distillation_student(
    source: nn.Module, options: ExportOptions, steps: Sequence[float | int]
) -> nn.Module:
    """The export of ``source`` that distillation fine-tunes, in eval mode (``source`` is left
    as it is).

    Raises:
        ValueError: ``options`` is not a fixed-grid export at each stage's depth; ``source``
            holds NaN or inf; a step count of ``steps`` does not fit a stage.
    """
    if options.steps is not None or options.method not in GRID_METHODS:
        raise ValueError(
            f"distill_depth fine-tunes a fixed-grid export ({', '.join(GRID_METHODS)}) at each "
            f"stage's depth: leave options.steps at None"
        )
    poisoned = first_non_finite(source.state_dict().items())
    if poisoned is not None:
        raise ValueError(
            f"the source's {poisoned!r} holds NaN or inf values, so every output distilled from "
            f"it would too; use finite weights"
        )
    student = export_neural_ode(source, options)
    for budget in steps:
        resolve_steps(student, budget)
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


class Cosine:
    """Learning-rate factor: linear warm-up over the first ``warmup`` share of ``total`` steps,
    then cosine from 1 to 0 over the rest (picklable; its state is ``total`` and ``warmup``)."""

    def __init__(self, total: int, warmup: float = 0.0) -> None:
        self.total = max(1, total)
        self.warmup = min(round(warmup * self.total), self.total - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay = self.total - self.warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - self.warmup, decay) / decay))


def schedule(
    optimizer: torch.optim.Optimizer, total: int, warmup: float, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The :class:`Cosine` schedule of ``optimizer`` over ``total`` steps, at ``step``."""
    if step:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Cosine(total, warmup), step - 1)


def checked_resume(
    path: Path,
    content: object,
    *,
    settings: Mapping[str, Any],
    student: nn.Module,
    epochs: int,
    per_epoch: int,
) -> dict[str, Any]:
    """The Lightning checkpoint ``content`` of file ``path`` once every field a resume uses is
    validated, with the optimizer's hyper-parameters and the schedule rebuilt from
    ``settings`` and the step it records (never read from the file).

    Checked: the distillation's format and ``settings`` (equal to this run's), the counters
    (a checkpoint is written at the end of an epoch: ``global_step = (epoch + 1) ·
    per_epoch``), the student's tensors (names, shapes, dtypes, finite, an export's horizons
    and knot times) and AdamW's moments and step counts (the parameters' shapes, finite,
    second moments >= 0). The callbacks' states are dropped.

    Raises:
        CheckpointError: the file is not a distillation checkpoint, is damaged, forged or was
            written for other settings; the message names it and what is wrong.
    """
    if not isinstance(content, dict) or not isinstance(content.get("distillation"), dict):
        raise CheckpointError(
            f"{path} is not a distillation checkpoint ({CHECKPOINT_FORMAT}); remove it or give "
            f"another checkpoint path"
        )
    record = content["distillation"]
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a distillation checkpoint of format {_short(record.get('format'))}, not "
            f"{CHECKPOINT_FORMAT}; remove it to start over"
        )
    missing = [k for k in ("state_dict", "epoch", "global_step", "optimizer_states", "loops")]
    missing = [k for k in missing if k not in content] + (
        ["settings"] if "settings" not in record else []
    )
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(map(repr, missing))}: it is damaged; remove it to start over"
        )
    _check_recorded_settings(path, record["settings"], settings)
    epoch, step = content["epoch"], content["global_step"]
    if type(epoch) is not int or not 0 <= epoch < epochs:
        raise CheckpointError(
            f"{path} records epoch {_short(epoch)}; it must be an int in [0, {epochs - 1}]: the "
            f"file is damaged, remove it to start over"
        )
    if type(step) is not int or step != (epoch + 1) * per_epoch:
        raise CheckpointError(
            f"{path} records {_short(step)} steps at the end of epoch {epoch + 1}, not "
            f"{(epoch + 1) * per_epoch}: the file is damaged or of another loader, remove it to "
            f"start over"
        )
    expected = {_PREFIX + key: value for key, value in student.state_dict().items()}
    model = _model_state(path, content["state_dict"], expected)
    _check_grids(path, model, student)
    parameters = [p for p in student.parameters() if p.requires_grad]
    states = content["optimizer_states"]
    if not (isinstance(states, list) and len(states) == 1):
        raise CheckpointError(f"{path}: 'optimizer_states' must hold one AdamW state")
    probe = torch.optim.AdamW(
        [torch.zeros_like(p) for p in parameters],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
    )
    rebuilt = schedule(probe, epochs * per_epoch, settings.get("warmup", 0.0), step)
    moments = _optimizer_state(path, states[0], parameters)
    return {
        **content,
        "state_dict": model,
        "optimizer_states": [
            {"state": moments, "param_groups": probe.state_dict()["param_groups"]}
        ],
        "lr_schedulers": [rebuilt.state_dict()],
        "callbacks": {},
    }


def _short(value: object, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, for messages about hostile values."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= width else f"{text[: width - 3]}..."


def _check_recorded_settings(path: Path, recorded: object, settings: Mapping[str, Any]) -> None:
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
    """The checkpoint's ``state_dict`` once checked to hold exactly ``expected``'s names, each a
    finite tensor of the same shape and dtype."""
    if not isinstance(found, dict):
        raise CheckpointError(
            f"{path}: 'state_dict' holds {type(found).__name__}, not the student's state dict"
        )
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(map(repr, set(found) - set(expected)))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: 'state_dict' does not match the student (another source or options?): "
            f"missing {missing[:5]}, unexpected [{', '.join(unexpected[:5])}]"
        )
    return {
        key: _checked_tensor(path, f"state_dict[{key!r}]", found[key], like)
        for key, like in expected.items()
    }


def _check_grids(path: Path, model: dict[str, Tensor], student: nn.Module) -> None:
    """Refuse horizons or knot times of ``model`` that no export has (as
    :func:`~resode_lightning.load_neural_ode` does): a positive horizon per stage, knot times
    increasing in ``[0, horizon]``."""
    for name, stage in student.named_modules():
        if not isinstance(stage, NeuralODEStage):
            continue
        prefix = f"{_PREFIX}{name}." if name else _PREFIX
        horizon = float(model[f"{prefix}horizon"])
        times = model[f"{prefix}field.path.times"].reshape(-1)
        ordered = times.numel() > 0 and bool((times[1:] > times[:-1]).all())
        if not (horizon > 0 and ordered and times[0] >= 0 and times[-1] <= horizon):
            raise CheckpointError(
                f"{path}: stage {name!r} has horizon {horizon:g} and knot times "
                f"{_short(times.tolist())}; an export has a positive horizon and increasing "
                f"times in [0, horizon]"
            )


def _optimizer_state(path: Path, found: object, parameters: list[Tensor]) -> dict[int, Any]:
    """The checkpoint's AdamW moments and step counts, each checked against its parameter."""
    entries = found.get("state") if isinstance(found, dict) else None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: 'optimizer_states' holds no AdamW state (a dict 'state')")
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
    return state


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


def first_non_finite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating-point tensor of ``named`` that holds NaN or inf."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _real(value: object) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)
