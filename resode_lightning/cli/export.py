"""Export a ResNet checkpoint as a neural ODE file (each residual stage solved by torchdiffeq).

The output path is checked before any work, and nothing is written unless the export's output
on a random batch is finite.
"""

from __future__ import annotations

import argparse
import math
import time
import types
import typing
from collections.abc import Callable
from typing import Any

from resode_lightning.cli._common import (
    add_architecture,
    add_max_classes,
    load_model,
    output_change,
    probe_batch,
)
from resode_lightning.core.io.atomic import atomic_write, writable_target
from resode_lightning.export.anytime import steps_of
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.deploy import deployable
from resode_lightning.export.formats import FORMATS, program_artifact
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.options import ExportOptions, flat_options
from resode_lightning.export.serialization import save_neural_ode

HELP = "export a ResNet checkpoint as a neural ODE (torchdiffeq, adjoint/checkpoint)"
MAX_SIZE = 1024
"""The largest ``--size``: the check batch's activations grow with its square."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_architecture(parser, inferred=True)
    parser.add_argument(
        "--weights",
        required=True,
        help="state dict: .pth, Lightning .ckpt, .safetensors, or a resode convert output",
    )
    parser.add_argument("--out", required=True, help="output file (written atomically)")
    parser.add_argument(
        "--format",
        default="pt",
        choices=FORMATS,
        help="what to write: "
        + "; ".join(f"{name}: {what}" for name, what in FORMATS.items())
        + f". Every format but pt runs the fixed grid of --method ({', '.join(GRID_METHODS)}) and "
        "--steps, and is checked against the model on a probe batch before it is written",
    )
    add_option_arguments(parser)
    parser.add_argument(
        "--size",
        type=int,
        default=64,
        help=f"image size of the random check batch, 1 to {MAX_SIZE} (default 64)",
    )
    add_max_classes(parser)


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument per name of the options' flat view (:func:`flat_options`): its default,
    choices and help, read as its field's real type says (:func:`text_type`)."""
    for option in flat_options():
        flag = "--" + option.name.replace("_", "-")
        if option.type is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=option.default,
                help=option.help,
            )
            continue
        parser.add_argument(
            flag,
            type=_argument_type(option.parse) if option.parse else text_type(option.type),
            default=option.default,
            choices=option.choices,
            help=option.help,
        )


def text_type(hint: Any) -> Callable[[str], Any]:
    """How to read a value of the type ``hint`` from text: ``int``, ``float`` or ``str``, or one
    of them ``| None`` (``none`` or ``null`` for ``None``).

    Raises:
        TypeError: any other type; give its field a ``parse`` in its metadata.
    """
    if hint in (int, float, str):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2:
        inner = next((arg for arg in args if arg is not type(None)), None)
        if type(None) in args and inner in (int, float, str):

            def optional(text: str) -> Any:
                return None if text.strip().lower() in ("none", "null") else inner(text)

            optional.__name__ = f"{inner.__name__} or None"
            return optional
    raise TypeError(
        f"no command-line reading of {hint!r}: give the option a 'parse' in its field metadata"
    )


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ``ValueError`` message becomes argparse's own line."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def options_from(args: argparse.Namespace) -> ExportOptions:
    """The :class:`ExportOptions` given on the command line."""
    return ExportOptions.from_config({o.name: getattr(args, o.name) for o in flat_options()})


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    options = options_from(args)
    if not 1 <= args.size <= MAX_SIZE:
        raise ValueError(f"--size must be between 1 and {MAX_SIZE} pixels, got {args.size}")
    writable_target(args.out)
    model, arch = load_model(
        args.weights, args.arch, args.arch_kwargs, max_classes=args.max_classes
    )
    exported = export_neural_ode(model, options)
    change = output_change(model, exported, args.size)
    if not math.isfinite(change):
        raise ValueError(
            f"the output check on a random batch is not finite (max relative change {change}): "
            f"the checkpoint's model or its export overflows; nothing was written. Check the "
            f"weights, or try another --method or --steps"
        )
    if args.format == "pt":
        save_neural_ode(exported, args.out, model=model)
        what = f"{sum(p.numel() for p in exported.parameters()):,} parameters"
    else:
        probe = probe_batch(model, args.size, seed=1)
        artifact = program_artifact(deployable(exported), args.format, probe)
        atomic_write(args.out, lambda file: file.write(artifact.data))
        what = f"{args.format} program, {artifact.error:.1e} from eager on a probe"
    settings = ", ".join(
        f"{name} {steps}" for name, (_, steps) in steps_of(exported).items() if steps is not None
    )
    print(
        f"exported {arch.spec} as a neural ODE ({options.method}"
        f"{', steps ' + settings if settings else ''}; gradient {options.gradient.name}): {what} "
        f"(source {sum(p.numel() for p in model.parameters()):,} parameters), max relative "
        f"output change {change:.2e} on a random batch, {time.perf_counter() - started:.1f} s; "
        f"wrote {args.out}"
    )
    return 0
