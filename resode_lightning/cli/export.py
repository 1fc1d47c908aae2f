"""Export a ResNet checkpoint as a neural ODE file (each residual stage solved by torchdiffeq)."""

from __future__ import annotations

import argparse
import json
import time

from resode_lightning.cli._common import output_change, torchvision_from_state_dict
from resode_lightning.core.io import load_state_dict_file
from resode_lightning.core.models import TORCHVISION_RESNETS
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.io import save_neural_ode
from resode_lightning.export.solve import ADAPTIVE_METHODS, FIXED_METHODS, GRADIENTS

HELP = "export a torchvision ResNet checkpoint as a neural ODE (torchdiffeq, adjoint/checkpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch", required=True, choices=TORCHVISION_RESNETS, help="torchvision architecture"
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="state dict: .pth, Lightning .ckpt, .safetensors, or a resode convert output",
    )
    parser.add_argument("--out", required=True, help="output file (written atomically)")
    parser.add_argument("--method", default="euler", choices=FIXED_METHODS + ADAPTIVE_METHODS)
    parser.add_argument(
        "--steps",
        default=None,
        help="fixed-grid steps: an int, a fraction of each stage's depth, or JSON {stage: int}",
    )
    parser.add_argument("--interpolation", default="linear", choices=("linear", "constant"))
    parser.add_argument("--gradient", default="checkpoint", choices=GRADIENTS)
    parser.add_argument(
        "--no-fold-bn", dest="fold_bn", action="store_false", help="keep BatchNorm in the field"
    )
    parser.add_argument(
        "--knots",
        type=int,
        default=None,
        help="least-squares knots per stage (default: one per block)",
    )
    parser.add_argument(
        "--rtol", type=float, default=1e-5, help="relative tolerance of adaptive methods"
    )
    parser.add_argument(
        "--atol", type=float, default=1e-6, help="absolute tolerance of adaptive methods"
    )
    parser.add_argument(
        "--size", type=int, default=64, help="image size of the random check batch (default 64)"
    )


def parse_steps(text: str | None) -> int | float | dict[str, int] | None:
    """``"8"`` -> 8, ``"0.5"`` -> 0.5, ``'{"layer3": 6}'`` -> dict; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            f"--steps must be an int, a fraction or a JSON object, got {text!r}"
        ) from None
    if not isinstance(value, (int, float, dict)) or isinstance(value, bool):
        raise ValueError(f"--steps must be an int, a fraction or a JSON object, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    steps = parse_steps(args.steps)
    model = torchvision_from_state_dict(load_state_dict_file(args.weights), args.arch)
    exported = export_neural_ode(
        model,
        method=args.method,
        steps=steps,
        interpolation=args.interpolation,
        gradient=args.gradient,
        fold_bn=args.fold_bn,
        knots=args.knots,
        rtol=args.rtol,
        atol=args.atol,
    )
    change = output_change(model, exported, args.size)
    save_neural_ode(exported, args.out)
    source_count = sum(p.numel() for p in model.parameters())
    export_count = sum(p.numel() for p in exported.parameters())
    print(
        f"exported {args.arch} as a neural ODE ({args.method}, gradient {args.gradient}): "
        f"{export_count:,} parameters (source {source_count:,}), max relative output change "
        f"{change:.2e} on a random batch, {time.perf_counter() - started:.1f} s; wrote {args.out}"
    )
    return 0
