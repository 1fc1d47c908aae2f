"""The options of a neural ODE export: one frozen, validated object.

Options that only mean something together are small frozen objects, so that a combination that
cannot run cannot be written: the gradient with its checkpoints (:class:`Backprop`,
:class:`Checkpointed`, :class:`RecursiveCheckpointed`, :class:`Adjoint`), and the weight
path's interpolation with its knots (:class:`PiecewiseLinear`, :class:`PiecewiseConstant`).

:func:`~resode_lightning.export_neural_ode`, the saved file's configuration,
:class:`~resode_lightning.NeuralODEExport` and ``resode export`` all take their options from
:class:`ExportOptions`. The file, the command line and keyword options read its flat view
(:func:`flat_options`): a group by its name (``gradient="recursive"``, the group with its
defaults) and a group's arguments by theirs (``checkpoints=4``), checked against the group
given. Adding an option is one field here: its ``help`` and its type make the CLI argument.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from resode_lightning.core.budget import MAX_STEPS, Steps, check_steps, not_int, parse_steps
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.solvers import ADAPTIVE_METHODS, FIXED_METHODS, METHODS

TOLERANCES = (1e-12, 1.0)
"""The range of ``rtol`` and ``atol`` of adaptive methods."""


class OptionGroup:
    """Options that only mean something together, as one frozen value: its constructor's
    arguments are its fields (default ``None``: the group's own default), ``help`` says what
    each does, ``name`` is the group's name in the file and on the command line."""

    name: ClassVar[str]
    help: ClassVar[Mapping[str, str]] = {}

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: make a new one")

    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        """The names of the group's arguments, in order."""
        return tuple(inspect.signature(cls).parameters)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, argument) for argument in self.arguments())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        values = ", ".join(f"{a}={getattr(self, a)!r}" for a in self.arguments())
        return f"{type(self).__name__}({values})"


class Backprop(OptionGroup):
    """Gradients through the solver's operations: memory grows with the steps."""

    name = "backprop"


class Checkpointed(OptionGroup):
    """``torch.utils.checkpoint`` around each solver step (each knot interval of an adaptive
    method): one stored state per step; gradients equal backprop's to rounding."""

    name = "checkpoint"


class RecursiveCheckpointed(OptionGroup):
    """Binomial checkpointing over the steps of a fixed-grid Runge-Kutta method: at most
    ``checkpoints`` stored states whatever the steps; gradients equal backprop's to rounding.

    Args:
        checkpoints: states stored, in ``[1, MAX_STEPS]`` (more than the steps are never used);
            ``None``: ``⌈log2 steps⌉ + 1``.

    Example::

        >>> ExportOptions(method="rk4", gradient=RecursiveCheckpointed(checkpoints=4)).gradient
        RecursiveCheckpointed(checkpoints=4)
    """

    name = "recursive"
    help = {
        "checkpoints": "states stored by gradient='recursive' (default: ceil(log2 steps)+1; "
        "more than the steps are never used)"
    }

    def __init__(self, checkpoints: int | None = None) -> None:
        if checkpoints is not None and (not_int(checkpoints) or not 1 <= checkpoints <= MAX_STEPS):
            raise ValueError(
                f"checkpoints must be an int in [1, {MAX_STEPS:,}] (more than the steps are never "
                f"used) or None, got {checkpoints!r}"
            )
        object.__setattr__(self, "checkpoints", checkpoints)


class Adjoint(OptionGroup):
    """torchdiffeq's continuous adjoint: memory constant in the steps, but inexact on ResNet
    grids (the export warns where it knows why)."""

    name = "adjoint"


class PiecewiseLinear(OptionGroup):
    """Weights linear in depth between knots.

    Args:
        knots: least-squares knots per stage, at least 2; ``None``: one knot per block.

    Example::

        >>> ExportOptions(interpolation=PiecewiseLinear(knots=3)).to_config()["knots"]
        3
    """

    name = "linear"
    help = {
        "knots": "least-squares knots per stage of interpolation='linear' (default: one per block)"
    }

    def __init__(self, knots: int | None = None) -> None:
        if knots is not None and (not_int(knots) or knots < 2):
            raise ValueError(f"knots must be an int >= 2 (None: one knot per block), got {knots!r}")
        object.__setattr__(self, "knots", knots)


class PiecewiseConstant(OptionGroup):
    """Each block's weights held constant over its step."""

    name = "constant"


GradientMode = Backprop | Checkpointed | RecursiveCheckpointed | Adjoint
"""How an export is differentiated."""
PathInterpolation = PiecewiseLinear | PiecewiseConstant
"""How an export's weights vary in depth between knots."""


@dataclass(frozen=True)
class ExportOptions:
    """How each residual stage becomes a neural ODE. Invalid values raise ``ValueError`` here.

    A group's name stands for the group with its defaults: ``gradient="recursive"`` is
    ``gradient=RecursiveCheckpointed()``; the fields always hold the group (their defaults are
    written by name, as a configuration file writes them).

    Example::

        >>> options = ExportOptions(method="rk4", steps=0.5, gradient="recursive")
        >>> options.gradient
        RecursiveCheckpointed(checkpoints=None)
        >>> options.replace(checkpoints=3).to_config()["checkpoints"]
        3
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
    interpolation: PathInterpolation | str = field(
        default="linear", metadata={"help": "weight path between knots"}
    )
    gradient: GradientMode | str = field(
        default="checkpoint",
        metadata={
            "help": "backprop; checkpoint (one state per step, exact); recursive (binomial "
            "checkpointing, `checkpoints` states, exact); adjoint (constant memory, inexact on "
            "ResNet grids)"
        },
    )
    fold_bn: bool = field(
        default=True,
        metadata={
            "help": "fold BatchNorm into the convs where a grid's weights are bound for "
            "inference (after interpolating: the function does not change)"
        },
    )
    rtol: float = field(
        default=1e-5, metadata={"help": "relative tolerance: adaptive methods, implicit_adams"}
    )
    atol: float = field(
        default=1e-6, metadata={"help": "absolute tolerance: adaptive methods, implicit_adams"}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the field"})

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            choices = next(f for f in fields(self) if f.name == "method").metadata["choices"]
            raise ValueError(f"method must be one of {choices}, got {self.method!r}")
        for name in _groups():
            object.__setattr__(self, name, _group(name, getattr(self, name)))
        _check_steps(self.method, self.steps)
        if isinstance(self.gradient, RecursiveCheckpointed) and self.method not in GRID_METHODS:
            raise ValueError(
                f"gradient='recursive' needs a method of {tuple(GRID_METHODS)}, got {self.method!r}"
            )
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
        """A copy with ``changes`` applied (and validated), by field or flat name.

        A group given anew starts from its defaults: ``replace(gradient="recursive",
        checkpoints=3)``; a group's argument alone changes the group in place:
        ``replace(checkpoints=3)`` when the gradient is already recursive.
        """
        _check_names(changes)
        flat = self.to_config()
        for name in changes.keys() & _groups().keys():
            flat.update(dict.fromkeys(_arguments(name), None))
        for name, value in changes.items():
            if name in _groups() and not isinstance(value, str):
                group = _group(name, value)
                twice = sorted(set(group.arguments()) & changes.keys())
                if twice:
                    raise ValueError(
                        f"{twice[0]} is given twice, as {twice[0]}={changes[twice[0]]!r} and in "
                        f"{name}={group!r}: give it once"
                    )
                flat.update(_flat_group(name, group))
            else:
                flat[name] = value
        return _from_flat(flat)

    def to_config(self) -> dict[str, Any]:
        """The options as a JSON-able dict, by flat name (see :func:`flat_options`)."""
        config: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _groups():
                config.update(_flat_group(f.name, value))
            else:
                config[f.name] = dict(value) if isinstance(value, Mapping) else value
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExportOptions:
        """Options from :meth:`to_config`'s dict (names left out keep their defaults).

        Raises:
            ValueError: not a mapping; an unknown name; an invalid value or combination.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"export options must be a mapping, got {type(config).__name__}")
        _check_names(config)
        return _from_flat(config)


@dataclass(frozen=True)
class FlatOption:
    """One name of the options' flat view (the saved config, the command line, keywords).

    Attributes:
        name: the name: an option, a group (its value is the group's name), or a group's
            argument.
        type: the type of its values (the group's name, a ``str``, for a group).
        default: its default; ``None`` for a group's argument (the group's own default).
        help: what it does.
        choices: the values it takes, where they are a fixed set.
        parse: how to read it from text, where its type alone does not say.
        group: for a group's argument, the name of its group.
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    group: str | None = None


@functools.cache
def flat_options() -> tuple[FlatOption, ...]:
    """The flat view of :class:`ExportOptions`, in field order, each group followed by its
    arguments; the types are read from the fields' real types, never from annotation text."""
    hints = typing.get_type_hints(ExportOptions)
    flat = []
    for option in fields(ExportOptions):
        meta = option.metadata
        kinds = _kinds(hints[option.name])
        if not kinds:
            flat.append(
                FlatOption(
                    option.name,
                    hints[option.name],
                    option.default,
                    meta["help"],
                    meta.get("choices"),
                    meta.get("parse"),
                )
            )
            continue
        names = tuple(kind.name for kind in kinds)
        flat.append(FlatOption(option.name, str, option.default, meta["help"], names))
        for argument, (kind, hint) in _arguments(option.name).items():
            help_ = kind.help[argument]
            flat.append(FlatOption(argument, hint, None, help_, group=option.name))
    return tuple(flat)


@functools.cache
def _groups() -> dict[str, tuple[type, ...]]:
    """``{field name: its group classes}`` of the grouped fields, read from their types."""
    hints = typing.get_type_hints(ExportOptions)
    found = {f.name: _kinds(hints[f.name]) for f in fields(ExportOptions)}
    return {name: kinds for name, kinds in found.items() if kinds}


def _kinds(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return ()
    return tuple(
        kind
        for kind in typing.get_args(hint)
        if isinstance(kind, type) and issubclass(kind, OptionGroup)
    )


@functools.cache
def _arguments(group: str) -> dict[str, tuple[type[OptionGroup], Any]]:
    """``{argument: (its group class, its type)}`` of a grouped field's classes.

    Raises:
        TypeError: an argument without ``None`` as its default or without help, or of two
            classes (the flat view could not tell which is meant).
    """
    found: dict[str, tuple[type[OptionGroup], Any]] = {}
    for kind in _groups()[group]:
        hints = typing.get_type_hints(kind.__init__)
        for argument in kind.arguments():
            default = inspect.signature(kind).parameters[argument].default
            if default is not None or argument in found or argument not in kind.help:
                raise TypeError(
                    f"{kind.__name__}({argument}=...): a group's arguments default to None, have "
                    f"help and names of their own"
                )
            found[argument] = (kind, hints[argument])
    return found


def _group(name: str, value: object) -> Any:
    """``value`` of the grouped field ``name`` as its group: a group, or a group's name."""
    kinds = _groups()[name]
    if isinstance(value, kinds):
        return value
    if isinstance(value, str):
        for kind in kinds:
            if value == kind.name:
                return kind()
    raise ValueError(
        f"{name} must be one of {tuple(kind.name for kind in kinds)} or a "
        f"{', '.join(kind.__name__ for kind in kinds)}, got {value!r}"
    )


def _flat_group(name: str, group: Any) -> dict[str, Any]:
    flat = {name: group.name}
    for argument in _arguments(name):
        flat[argument] = getattr(group, argument, None)
    return flat


def _from_flat(flat: Mapping[str, Any]) -> ExportOptions:
    """Options from flat names (see :func:`flat_options`); a group's argument that is ``None``
    is not given."""
    values = {f.name: flat[f.name] for f in fields(ExportOptions) if f.name in flat}
    for name in _groups():
        kind = type(_group(name, flat.get(name, _default(name))))
        given = {a: flat[a] for a in _arguments(name) if flat.get(a) is not None}
        for argument, value in given.items():
            owner = _arguments(name)[argument][0]
            owner(**{argument: value})  # an invalid value is refused as such first
            if owner is not kind:
                raise ValueError(
                    f"{argument}={value!r} is an argument of {name}={owner.name!r}, not of "
                    f"{name}={kind.name!r}: give {name}={owner.name!r} with it, or "
                    f"{name}={owner.__name__}({argument}={value!r})"
                )
        values[name] = kind(**given)
    return ExportOptions(**values)


def _default(name: str) -> Any:
    return next(f.default for f in fields(ExportOptions) if f.name == name)


def _check_names(names: Mapping[str, Any]) -> None:
    known = [option.name for option in flat_options()]
    unknown = sorted(set(names) - set(known), key=str)
    if unknown:
        raise ValueError(f"unknown export option(s) {unknown}; options are {known}")


def _check_steps(method: str, steps: Steps) -> None:
    if steps is None:
        return
    if METHODS[method].adaptive:
        raise ValueError(
            f"steps={steps!r} is for fixed-grid methods: {method} chooses its own steps from rtol "
            f"and atol; pass steps=None, or a fixed-grid method such as 'rk4'"
        )
    check_steps(steps)
