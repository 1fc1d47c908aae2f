"""The options of a neural ODE export: one frozen, validated object.

:func:`~resode_lightning.export_neural_ode`, the saved file's configuration,
:class:`~resode_lightning.NeuralODEExport` and ``resode export`` all take their options from
:class:`ExportOptions`; adding an option is one field here (its ``help`` feeds the CLI).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from resode_lightning.core.budget import MAX_STEPS, Steps, check_steps, not_int, parse_steps
from resode_lightning.core.paths import INTERPOLATIONS
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.solve import ADAPTIVE_METHODS, FIXED_METHODS, GRADIENTS

TOLERANCES = (1e-12, 1.0)
"""The range of ``rtol`` and ``atol`` of adaptive methods."""


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "null") else int(text)


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
            not_int(self.checkpoints)
            or not 1 <= self.checkpoints <= MAX_STEPS
            or self.gradient != "recursive"
        ):
            raise ValueError(
                f"checkpoints must be an int in [1, {MAX_STEPS:,}] (more than the steps are never "
                f"used) and only given with gradient='recursive', got {self.checkpoints!r} with "
                f"gradient={self.gradient!r}"
            )
        if self.knots is not None:
            if not_int(self.knots) or self.knots < 2:
                raise ValueError(
                    f"knots must be an int >= 2 (None: one knot per block), got {self.knots!r}"
                )
            if self.interpolation != "linear":
                raise ValueError("knots=... fits a linear path: use interpolation='linear'")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            low, high = TOLERANCES
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
            if not low <= value <= high:
                raise ValueError(
                    f"{name} must be in [{low:g}, {high:g}] (below it no float64 solve can meet "
                    f"it, above it nothing is controlled), got {value!r}"
                )
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
