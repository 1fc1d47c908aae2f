"""Convert a torchvision ResNet checkpoint to ODE form (same function, rescaled stages)."""

from __future__ import annotations

import argparse
import time

import torch

from resode_lightning.core.io import atomic_save, load_into, load_state_dict_file, strip_prefix
from resode_lightning.core.models import TORCHVISION_RESNETS, torchvision_resnet
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
    state_dict = load_state_dict_file(args.weights)
    model = torchvision_resnet(args.arch, num_classes=_num_classes(state_dict, args.arch))
    load_into(model, strip_prefix(state_dict, model)).eval()
    converted = to_ode_form(model, horizon=args.horizon)
    error = conversion_error(model, converted)
    atomic_save(converted.state_dict(), args.out)
    print(
        f"converted {args.arch} to ODE form (horizon {args.horizon:g}): max relative output "
        f"change {error:.2e} on a random batch, {time.perf_counter() - started:.1f} s; "
        f"wrote {args.out}"
    )
    return 0


def _num_classes(state_dict: dict[str, torch.Tensor], arch: str) -> int:
    heads = [v for k, v in state_dict.items() if k.endswith("fc.weight") and v.dim() == 2]
    if not heads:
        raise ValueError(f"the checkpoint has no 'fc.weight' key: it is not a {arch} state dict")
    return heads[0].shape[0]


@torch.no_grad()
def conversion_error(plain: torch.nn.Module, converted: torch.nn.Module, size: int = 64) -> float:
    """max |y_ode - y| / max |y| on a fixed random batch, both models in eval mode."""
    batch = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    reference = plain.eval()(batch)
    return float((converted.eval()(batch) - reference).abs().max() / reference.abs().max())
