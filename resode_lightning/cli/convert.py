"""Convert a ResNet checkpoint to ODE form (same function, rescaled stages).

Nothing is written unless the converted model computes the original function: the maximum
relative change of the output on a random batch must be finite and at most --tolerance.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from resode_lightning.cli._common import (
    add_architecture,
    add_max_classes,
    load_model,
    output_change,
)
from resode_lightning.core.io.atomic import atomic_save, writable_target
from resode_lightning.core.odeform import check_step, to_ode_form
from resode_lightning.core.stages import find_stages

HELP = "convert a ResNet checkpoint (.pth/.ckpt) to ODE form"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_architecture(parser, inferred=True)
    parser.add_argument(
        "--weights", required=True, help="input state dict (.pth, Lightning .ckpt, .safetensors)"
    )
    parser.add_argument("--out", required=True, help="output file (written atomically)")
    parser.add_argument(
        "--horizon", type=float, default=1.0, help="time interval of each stage (default 1.0)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest relative output change accepted before writing (default 1e-4)",
    )
    add_max_classes(parser)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if not (math.isfinite(args.horizon) and args.horizon > 0):
        raise ValueError(f"--horizon must be a finite positive number, got {args.horizon!r}")
    if args.arch is not None and args.arch.family != "user":  # before any work
        with torch.device("meta"):
            _check_horizon(args.horizon, args.arch.call(**args.arch_kwargs))
    writable_target(args.out)
    model, arch = load_model(
        args.weights, args.arch, args.arch_kwargs, max_classes=args.max_classes
    )
    converted = to_ode_form(model, horizon=args.horizon)  # checks every stage's step first
    error = output_change(model, converted)
    if not error <= args.tolerance:
        raise ValueError(
            f"the converted model does not compute the original function: max relative output "
            f"change {error:.3g} on a random batch, above --tolerance {args.tolerance:g}; "
            f"nothing was written"
        )
    atomic_save(converted.state_dict(), args.out)
    print(
        f"converted {arch.spec} to ODE form (horizon {args.horizon:g}): max relative output "
        f"change {error:.2e} on a random batch, {time.perf_counter() - started:.1f} s; "
        f"wrote {args.out}"
    )
    return 0


def _check_horizon(horizon: float, model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless every stage of ``model`` can take a step of ``horizon / L``."""
    for stage in find_stages(model):
        check_step(horizon, stage)
