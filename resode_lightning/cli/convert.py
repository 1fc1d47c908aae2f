"""Convert a torchvision ResNet checkpoint to ODE form (same function, rescaled stages)."""

from __future__ import annotations

import argparse
import time

from resode_lightning.cli._common import output_change, torchvision_from_state_dict
from resode_lightning.core.io import atomic_save, load_state_dict_file
from resode_lightning.core.models import TORCHVISION_RESNETS
from resode_lightning.core.odeform import to_ode_form

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


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model = torchvision_from_state_dict(load_state_dict_file(args.weights), args.arch)
    converted = to_ode_form(model, horizon=args.horizon)
    error = output_change(model, converted)
    atomic_save(converted.state_dict(), args.out)
    print(
        f"converted {args.arch} to ODE form (horizon {args.horizon:g}): max relative output "
        f"change {error:.2e} on a random batch, {time.perf_counter() - started:.1f} s; "
        f"wrote {args.out}"
    )
    return 0
