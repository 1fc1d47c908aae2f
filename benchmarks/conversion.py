"""Conversion error and time of `to_ode_form` on the torchvision ResNets.

For each architecture (random weights with randomised BN statistics, as a trained net has):
max |y_ode - y| / max |y| in float32 eval mode and in float64 train mode, and the time
`to_ode_form` takes. Writes results/conversion.{json,md}.

    python benchmarks/conversion.py [--size 224] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision.models as tvm
from _common import environment, write_results
from torch import nn

from resode_lightning import find_stages, to_ode_form
from resode_lightning.testing import randomize_norms

ARCHS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
]


def trained_like(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(tvm.get_model(arch, num_classes=1000), seed)


def relative_error(model: nn.Module, converted: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference = model(x)
        return float((converted(x) - reference).abs().max() / reference.abs().max())


def measure(arch: str, size: int, device: str) -> dict:
    model = trained_like(arch).to(device).eval()
    started = time.perf_counter()
    converted = to_ode_form(model)
    seconds = time.perf_counter() - started
    x = torch.randn(2, 3, size, size, device=device)
    eval_error = relative_error(model, converted.eval(), x)
    model64 = model.double().train()
    train_error = relative_error(model64, to_ode_form(model64), x.double())
    return {
        "arch": arch,
        "stages (blocks)": " ".join(f"{s.name}:{s.depth}" for s in find_stages(model)),
        "eval fp32 max rel error": f"{eval_error:.1e}",
        "train fp64 max rel error": f"{train_error:.1e}",
        "convert time (s)": f"{seconds:.2f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input image size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = [measure(arch, args.size, args.device) for arch in ARCHS]
    for row in rows:
        print(row)
    path = write_results(
        "conversion",
        environment(args.device),
        rows,
        list(rows[0]),
        notes=f"Batch 2, {args.size}x{args.size} random input; "
        "bounds: fp32 eval <= 1e-5, fp64 train <= 1e-9.",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
