"""Convert a torchvision ResNet checkpoint to ODE form (same function, rescaled stages).

Nothing is written unless the converted model computes the original function: the maximum
relative change of the output on a random batch must be finite and at most --tolerance.
"""

from __future__ import annotations

import argparse
import math
import time

from resode_lightning.cli._common import (
    add_max_classes,
    load_torchvision,
    output_change,
    skeleton,
)
from resode_lightning.core.files import atomic_save, writable_target
from resode_lightning.core.models import TORCHVISION_RESNETS
from resode_lightning.core.odeform import check_step, to_ode_form
from resode_lightning.core.stages import find_stages

HELP = "convert a torchvision ResNet checkpoint (.pth/.ckpt) to ODE form"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch", required=True, choices=TORCHVISION_RESNETS, help="torchvision architecture"
    )
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
    for stage in find_stages(skeleton(args.arch)):  # before any work: a horizon they can use
        check_step(args.horizon, stage)
    writable_target(args.out)
    model, _ = load_torchvision(args.weights, args.arch, max_classes=args.max_classes)
    converted = to_ode_form(model, horizon=args.horizon)
    error = output_change(model, converted)
    if not error <= args.tolerance:
        raise ValueError(
            f"the converted model does not compute the original function: max relative output "
            f"change {error:.3g} on a random batch, above --tolerance {args.tolerance:g}; "
            f"nothing was written"
        )
    atomic_save(converted.state_dict(), args.out)
    print(
        f"converted {args.arch} to ODE form (horizon {args.horizon:g}): max relative output "
        f"change {error:.2e} on a random batch, {time.perf_counter() - started:.1f} s; "
        f"wrote {args.out}"
    )
    return 0
