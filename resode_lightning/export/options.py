"""The options of a neural ODE export: one frozen, validated object.

:func:`~resode_lightning.export_neural_ode`, the saved file's configuration,
:class:`~resode_lightning.NeuralODEExport` and ``resode export`` all take their options from
:class:`ExportOptions`; adding an option is one field here (its ``help`` feeds the CLI).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from resode_lightning.core.paths import INTERPOLATIONS
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.solve import ADAPTIVE_METHODS, FIXED_METHODS, GRADIENTS

Steps = int | float | Mapping[str, int] | None
"""A budget of solver steps: ``None`` (each stage's depth), an int for every stage, a fraction of
each stage's depth, or ``{stage name: int}`` (stages not named keep theirs)."""
MAX_STEPS = 100_000
"""The most solver steps per stage an export may take."""


def check_steps(steps: Steps) -> None:
    """Raise ``ValueError`` unless ``steps`` is a valid budget (``None`` included).

    A budget is ``None`` (each stage's depth), an int in ``[1, MAX_STEPS]`` for every stage, a
    positive fraction of each stage's depth (``0.5``: half), or ``{stage name: int}``.
    """
    if steps is None:
        return
    if isinstance(steps, Mapping):
        for name, count in steps.items():
            if not isinstance(name, str) or _not_int(count) or not 1 <= count <= MAX_STEPS:
                raise ValueError(
                    f"steps[{name!r}] must be an int in [1, {MAX_STEPS:,}], got {count!r}"
                )
        return
    if isinstance(steps, int) and not isinstance(steps, bool):
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an int in [1, {MAX_STEPS:,}], got {steps!r}")
        return
    if not isinstance(steps, float) or not 0 < steps <= MAX_STEPS:
        raise ValueError(
            f"steps must be an int in [1, {MAX_STEPS:,}], a positive fraction of each stage's "
            f"depth, or a dict by stage name, got {steps!r}"
        )


def parse_steps(text: str) -> Steps:
    """A budget from command-line text: ``"8"``, ``"0.5"``, ``'{"layer3": 6}'`` or ``"None"``.

    Raises:
        ValueError: anything else, or an invalid budget.
    """
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise ValueError(
            f"steps must be an int, a fraction, a JSON object by stage name or None, got {text!r}"
        )
    check_steps(value)
    return value


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "null") else int(text)


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


@dataclass(frozen=True)
class ExportOptions:
    """How each residual stage becomes a neural ODE. Invalid values raise ``ValueError`` here.

    Example::

        >>> ExportOptions(method="rk4", steps=0.5).to_config()["steps"]
        0.5
    """

    method: str = field(
        default="euler",
        metadata={
            "help": "torchdiffeq method: fixed-grid or adaptive",
            "choices": FIXED_METHODS + ADAPTIVE_METHODS,
        },
    )
    steps: Steps = field(
        default=None,
        metadata={
            "help": "fixed-grid steps per stage: None (each stage's depth), an int, a fraction "
            "of each stage's depth, or {stage name: int}",
            "parse": parse_steps,
        },
    )
    interpolation: str = field(
        default="linear",
        metadata={"help": "weight path between knots", "choices": INTERPOLATIONS},
    )
    gradient: str = field(
        default="checkpoint",
        metadata={
            "help": "backprop; checkpoint (one state per step, exact); recursive (binomial "
            "checkpointing, `checkpoints` states, exact); adjoint (constant memory, inexact on "
            "ResNet grids)",
            "choices": GRADIENTS,
        },
    )
    checkpoints: int | None = field(
        default=None,
        metadata={
            "help": "states stored by gradient='recursive' (default: ceil(log2 steps)+1)",
            "parse": _optional_int,
        },
    )
    fold_bn: bool = field(
        default=True,
        metadata={
            "help": "fold BatchNorm into the convs where a grid's weights are bound for "
            "inference (after interpolating: the function does not change)"
        },
    )
    knots: int | None = field(
        default=None,
        metadata={
            "help": "least-squares knots per stage (default: one per block)",
            "parse": _optional_int,
        },
    )
    rtol: float = field(
        default=1e-5, metadata={"help": "relative tolerance, adaptive methods", "parse": float}
    )
    atol: float = field(
        default=1e-6, metadata={"help": "absolute tolerance, adaptive methods", "parse": float}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the field"})

    def __post_init__(self) -> None:
        _choice("method", self.method)
        _choice("interpolation", self.interpolation)
        _choice("gradient", self.gradient)
        _check_steps(self.method, self.steps)
        if self.gradient == "recursive" and self.method not in GRID_METHODS:
            raise ValueError(
                f"gradient='recursive' needs a method of {tuple(GRID_METHODS)}, got {self.method!r}"
            )
        if self.checkpoints is not None and (
            _not_int(self.checkpoints) or self.checkpoints < 1 or self.gradient != "recursive"
        ):
            raise ValueError(
                f"checkpoints must be an int >= 1 and only given with gradient='recursive', got "
                f"{self.checkpoints!r} with gradient={self.gradient!r}"
            )
        if self.knots is not None:
            if _not_int(self.knots) or self.knots < 2:
                raise ValueError(
                    f"knots must be an int >= 2 (None: one knot per block), got {self.knots!r}"
                )
            if self.interpolation != "linear":
                raise ValueError("knots=... fits a linear path: use interpolation='linear'")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("fold_bn", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> ExportOptions:
        """A copy with ``changes`` applied (and validated)."""
        _check_names(changes)
        return replace(self, **changes)

    def to_config(self) -> dict[str, Any]:
        """The options as a JSON-able dict."""
        config = asdict(self)
        if isinstance(self.steps, Mapping):
            config["steps"] = dict(self.steps)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExportOptions:
        """Options from :meth:`to_config`'s dict; unknown names raise ``ValueError``."""
        if not isinstance(config, Mapping):
            raise ValueError(f"export options must be a mapping, got {type(config).__name__}")
        _check_names(config)
        return cls(**config)


def _check_names(names: Mapping[str, Any]) -> None:
    known = [option.name for option in fields(ExportOptions)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown export option(s) {unknown}; options are {known}")


def _choice(name: str, value: object) -> None:
    choices = next(f.metadata["choices"] for f in fields(ExportOptions) if f.name == name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_steps(method: str, steps: Steps) -> None:
    if steps is None:
        return
    if method in ADAPTIVE_METHODS:
        raise ValueError(
            f"steps={steps!r} is for fixed-grid methods: {method} chooses its own steps from rtol "
            f"and atol; pass steps=None, or a fixed-grid method such as 'rk4'"
        )
    check_steps(steps)


def steps_per_stage(
    steps: Steps, depths: Mapping[str, int | None], current: Mapping[str, int]
) -> dict[str, int]:
    """The steps of every stage under the budget ``steps``: the one reading of a budget.

    Args:
        steps: a budget (see :func:`check_steps`).
        depths: ``{stage name: source depth L}`` (``None``: not recorded).
        current: the steps of stages a mapping does not name (and of all stages for ``None``).

    Returns:
        ``{stage name: steps}``; a fraction ``f`` gives ``max(1, round(f * L))``.

    Raises:
        ValueError: an invalid budget; a name that is no stage; more than ``MAX_STEPS`` steps;
            a fraction for a stage whose depth is not recorded.
    """
    check_steps(steps)
    if steps is None:
        return dict(current)
    if isinstance(steps, Mapping):
        unknown = sorted(set(steps) - set(depths))
        if unknown:
            raise ValueError(f"steps names unknown stage(s) {unknown}; stages are {list(depths)}")
        return {name: steps.get(name, current[name]) for name in depths}
    if isinstance(steps, int):
        return dict.fromkeys(depths, steps)
    counts = {}
    for name, depth in depths.items():
        if depth is None:
            raise ValueError(
                f"stage {name!r} does not record its source depth (exported by an older "
                f"version): give steps as an int or a dict"
            )
        counts[name] = max(1, round(steps * depth))
        if counts[name] > MAX_STEPS:
            raise ValueError(
                f"steps={steps!r} of stage {name!r}'s depth {depth} gives {counts[name]:,} steps, "
                f"more than {MAX_STEPS:,}"
            )
    return counts
