"""Anytime inference: an exported neural ODE run at a step count chosen at run time.

An export solves each stage on a fixed grid of ``steps`` steps; :func:`set_steps` changes the
grid of every stage (or of named stages) in place, without re-exporting, and :func:`at_steps`
does so for the duration of a ``with`` block. The weights bound for each grid are kept, so a
model switched back and forth between budgets pays the binding once per grid.
:func:`accuracy_vs_steps` measures accuracy and latency of one model at several budgets on a
loader: the curve a user picks a budget from.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from resode_lightning.core.budget import Steps, steps_per_stage
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.solve import NeuralODEStage
from resode_lightning.export.solvers import ADAPTIVE_METHODS, FIXED_METHODS, METHODS

Setting = tuple[str, Steps]
"""``(method, steps)``: a fixed-grid method and a budget."""


def ode_stages(model: nn.Module) -> dict[str, NeuralODEStage]:
    """``{stage name: NeuralODEStage}`` of an exported model, in order.

    Raises:
        ValueError: ``model`` holds no neural ODE stage (it was not made by
            :func:`~resode_lightning.export_neural_ode`).
    """
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, NeuralODEStage):
            found[module.stage_name or path] = module
    if not found:
        raise ValueError(
            f"{type(model).__name__} holds no NeuralODEStage; export it with export_neural_ode"
        )
    return found


def resolve_steps(model: nn.Module, steps: Steps) -> dict[str, int]:
    """The steps each stage of ``model`` runs with under the budget ``steps``.

    ``None`` keeps every stage's steps; see
    :func:`~resode_lightning.export.options.steps_per_stage` for the rest.

    Raises:
        ValueError: an invalid budget (see :func:`~resode_lightning.export.options.check_steps`);
            a name that is no stage of ``model``.
    """
    stages = ode_stages(model)
    depths = {name: stage.source_depth for name, stage in stages.items()}
    return steps_per_stage(steps, depths, {name: stage.steps for name, stage in stages.items()})


def steps_of(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """``{stage name: (method, steps)}``: what each stage of ``model`` runs with now."""
    return {name: (stage.method, stage.steps) for name, stage in ode_stages(model).items()}


def set_steps(
    model: nn.Module, steps: Steps, method: str | None = None
) -> dict[str, tuple[str, int | None]]:
    """Make the stages of an exported model run ``steps`` fixed-grid steps, in place.

    Args:
        model: a model returned by :func:`~resode_lightning.export_neural_ode` (or loaded by
            :func:`~resode_lightning.load_neural_ode`).
        steps: an int (every stage), a fraction of each stage's source depth (``0.5``: half
            the steps), or ``{stage name: int}`` (the other stages are left as they are).
        method: a fixed-grid method to switch to (``"euler"``, ``"rk4"``, ...); ``None`` keeps
            each stage's method.

    Returns:
        The previous ``{stage name: (method, steps)}``, for :func:`restore_steps`.

    Raises:
        ValueError: an invalid budget; ``method`` is not a fixed-grid method; a stage would be
            left with an adaptive method (which chooses its own steps).

    Example::

        >>> from resode_lightning import export_neural_ode, ode_resnet
        >>> ode = export_neural_ode(ode_resnet(depths=(16,), widths=(8,)).eval())
        >>> previous = set_steps(ode, 0.25)
        >>> steps_of(ode)
        {'stages.0': ('euler', 4)}
    """
    if method is not None and method not in FIXED_METHODS:
        raise ValueError(f"method must be a fixed-grid method {FIXED_METHODS}, got {method!r}")
    counts = resolve_steps(model, steps)
    stages = ode_stages(model)
    if method is None:
        adaptive = [name for name, stage in stages.items() if stage.method in ADAPTIVE_METHODS]
        if adaptive:
            raise ValueError(
                f"stages {adaptive} use an adaptive method, which chooses its own steps; pass "
                f"method='euler' (or another fixed-grid method) to set_steps"
            )
    recursive = [name for name, stage in stages.items() if stage.gradient == "recursive"]
    if method is not None and method not in GRID_METHODS and recursive:
        raise ValueError(
            f"stages {recursive} use gradient='recursive', which needs a method of "
            f"{tuple(GRID_METHODS)}, got {method!r}"
        )
    previous = steps_of(model)
    for name, stage in stages.items():
        stage.method = method or stage.method
        stage.steps = counts[name]
    return previous


def restore_steps(model: nn.Module, settings: Mapping[str, tuple[str, int | None]]) -> None:
    """Give the stages of ``model`` the ``{stage name: (method, steps)}`` of :func:`steps_of`."""
    stages = ode_stages(model)
    for name, (method, steps) in settings.items():
        stages[name].method, stages[name].steps = method, steps


@contextmanager
def at_steps(model: nn.Module, steps: Steps, method: str | None = None) -> Iterator[nn.Module]:
    """Run ``model`` at ``steps`` (and ``method``) inside the ``with`` block, then restore it.

    Example::

        >>> from resode_lightning import export_neural_ode, ode_resnet
        >>> ode = export_neural_ode(ode_resnet(depths=(16,), widths=(8,)).eval())
        >>> with at_steps(ode, 4):
        ...     fast = ode(torch.randn(2, 3, 32, 32))
        >>> steps_of(ode)
        {'stages.0': ('euler', 16)}
    """
    previous = set_steps(model, steps, method)
    try:
        yield model
    finally:
        restore_steps(model, previous)


def field_evaluations(model: nn.Module) -> int | None:
    """Vector-field evaluations of one forward, summed over stages (``None``: adaptive or
    multistep methods, whose count is not fixed)."""
    total = 0
    for stage in ode_stages(model).values():
        per_step = METHODS[stage.method].evaluations
        if per_step is None or stage.steps is None:
            return None
        total += per_step * stage.steps
    return total


@torch.no_grad()
def accuracy_vs_steps(
    model: nn.Module,
    loader: Iterable[Any],
    settings: Sequence[Steps | Setting] = (1.0, 0.5, 0.25),
    *,
    reference: nn.Module | None = None,
    device: str | torch.device | None = None,
    warmup: int = 1,
) -> list[dict[str, Any]]:
    """Top-1 accuracy and latency of an exported model at several budgets, on ``loader``.

    Every batch runs through every setting in turn (the order rotated from batch to batch), so
    that all settings share the machine's drift; the forwards of the first ``warmup`` batches
    are not timed. The model is restored to its own steps afterwards.

    Args:
        model: an exported model (its mode is left as it is; use ``model.eval()``).
        loader: batches ``(images, labels, ...)``.
        settings: budgets (see :func:`set_steps`), each with the model's own method, or
            ``(method, budget)`` pairs: ``[("euler", 1.0), ("rk4", 0.25)]``.
        reference: a model timed (and scored) alongside, e.g. the source ResNet; its row has
            ``setting`` ``"reference"`` and every row's ``latency_ratio`` is relative to it
            (else to the first setting).
        device: where to run (default: the device of the model's first parameter).
        warmup: leading batches run but not timed.

    Returns:
        One dict per setting (the reference first): ``setting``, ``method``,
        ``steps`` (``{stage: steps}``), ``evaluations`` (field evaluations per forward, summed
        over stages), ``accuracy``, ``images``, ``latency_ms`` (median over timed full-size
        batches), ``latency_ratio``.

    Raises:
        ValueError: an invalid setting; the loader yields no timed full-size batch.
    """
    device = torch.device(device) if device is not None else _device(model)
    runs: dict[str, dict[str, Any]] = {}
    if reference is not None:
        runs["reference"] = {"net": reference, "state": None, "method": None, "steps": None}
    original = steps_of(model)
    try:
        for setting in settings:
            method, budget = setting if isinstance(setting, tuple) else (None, setting)
            set_steps(model, budget, method)
            state = steps_of(model)
            runs[_label(method, budget)] = {
                "net": model,
                "state": state,
                "method": next(iter(state.values()))[0],
                "steps": {name: steps for name, (_, steps) in state.items()},
                "evaluations": field_evaluations(model),
            }
            restore_steps(model, original)
        correct = dict.fromkeys(runs, 0)
        seconds: dict[str, list[float]] = {label: [] for label in runs}
        count, size = 0, None
        for index, batch in enumerate(loader):
            images, labels = batch[0].to(device), batch[1].to(device)
            size = size or len(labels)
            count += len(labels)
            order = list(runs)
            for label in order[index % len(order) :] + order[: index % len(order)]:
                run = runs[label]
                if run["state"] is not None:
                    restore_steps(model, run["state"])
                elapsed, logits = _timed(run["net"], images)
                if index >= warmup and len(labels) == size:
                    seconds[label].append(elapsed)
                correct[label] += int((logits.argmax(1) == labels).sum())
    finally:
        restore_steps(model, original)
    if not all(seconds.values()):
        raise ValueError(
            f"accuracy_vs_steps needs more than warmup={warmup} full-size batches to time"
        )
    rows = [
        {
            "setting": label,
            "method": run["method"],
            "steps": run["steps"],
            "evaluations": run.get("evaluations"),
            "accuracy": correct[label] / count,
            "images": count,
            "latency_ms": 1e3 * statistics.median(seconds[label]),
        }
        for label, run in runs.items()
    ]
    for row in rows:
        row["latency_ratio"] = row["latency_ms"] / rows[0]["latency_ms"]
    return rows


def _timed(model: nn.Module, images: Tensor) -> tuple[float, Tensor]:
    sync = torch.cuda.synchronize if images.is_cuda else None
    if sync is not None:
        sync()
    started = time.perf_counter()
    logits = model(images)
    if sync is not None:
        sync()
    return time.perf_counter() - started, logits


def _label(method: str | None, budget: Steps) -> str:
    text = str(dict(budget)) if isinstance(budget, Mapping) else f"{budget:g}"
    return text if method is None else f"{method} {text}"


def _device(model: nn.Module) -> torch.device:
    reference = next(iter(model.parameters()), None)
    return reference.device if reference is not None else torch.device("cpu")
