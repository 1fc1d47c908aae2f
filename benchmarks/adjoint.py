"""How wrong the adjoint's gradients are, next to what its memory saves.

For each net, solver and number of steps, the same export is differentiated twice in float64:
with ``gradient="backprop"`` (the exact gradient of the discrete solve) and with
``gradient="adjoint"`` (torchdiffeq's continuous adjoint, reconstructed backwards in time).
Reported: the relative error ``|g_adjoint - g_backprop| / |g_backprop|`` of the gradient of a
cross-entropy loss (fixed random labels) over the parameters of the ODE stages (what the
adjoint computes) and over all parameters (what an optimiser sees), whether the export warned
that the adjoint is inexact, and the peak memory and time of one training step of each mode
(:func:`resode_lightning.apps.memory_benchmark.measure_step`: ``torch.cuda.max_memory_allocated``
on CUDA, the peak-RSS proxy of :mod:`resode_lightning.apps.memory_benchmark` on CPU, each measured
in a fresh forked process).

Nets (random weights, eval mode, BatchNorm at its default statistics, folded by the export):

- ``tied``: ``ode_resnet`` (one stage of 16 pre-activation blocks of width 16) from the tied
  init, whose zeroed last BatchNorm of each branch is set back to weight 1 so that the field is
  not zero: the same block in every step, an autonomous ODE (smooth);
- ``smooth``: the same net from the ``smooth`` init, weights a smooth random path in depth;
- ``iid``: the same net from the i.i.d. init (rough: no continuum limit);
- ``resnet34``: torchvision's resnet34 (post-activation, stages of 2/3/5/2 identity blocks,
  rough), 32x32 images, ``L`` steps only.

Solvers: Euler and rk4, each at ``L`` (the stage's depth) and ``4L`` steps per stage (resnet34:
``L`` only).

    python benchmarks/adjoint.py [--device cpu|cuda]

Writes ``results/adjoint.{json,md}`` (CPU) or ``results/adjoint_cuda.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from _common import RESULTS, environment, write_results
from torch import Tensor, nn
from torch.nn import functional

from resode_lightning.apps.memory_benchmark import in_fresh_process, measure_step
from resode_lightning.core.io.atomic import atomic_write_text
from resode_lightning.core.models import ode_resnet, torchvision_resnet
from resode_lightning.export import export_neural_ode
from resode_lightning.export.solve import NeuralODEStage

STEPS: dict[str, float] = {"L": 1.0, "4L": 4.0}
"""Steps per stage, as fractions of each stage's depth."""
NETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "tied": (16, ("L", "4L")),
    "smooth": (16, ("L", "4L")),
    "iid": (16, ("L", "4L")),
    "resnet34": (32, ("L",)),
}
"""The nets measured, with the side of their input images and their steps (resnet34's
adjoint, whose augmented state carries its 21M parameters' gradients, takes minutes per
training step on CPU at 4L)."""
METHODS: tuple[str, ...] = ("euler", "rk4")
T = TypeVar("T")


def source_model(name: str) -> nn.Module:
    """The named net (see the module docstring) in float64, eval mode."""
    if name == "resnet34":
        torch.manual_seed(0)
        model = torchvision_resnet("resnet34", num_classes=10)
    else:
        model = ode_resnet(depths=(16,), widths=(16,), init=name, seed=0)
        if name == "tied":
            for stage in model.stages:
                for block in stage:
                    nn.init.ones_(block.bn2.weight)
    return model.double().eval()


def stage_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model``'s ODE stages."""
    return {
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, NeuralODEStage)
        for name, _ in module.named_parameters()
    }


def gradients(model: nn.Module, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The gradient of the cross-entropy of ``model(x)`` against ``labels``, by parameter."""
    model.zero_grad(set_to_none=True)
    functional.cross_entropy(model(x), labels).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def relative_error(approx: dict[str, Tensor], exact: dict[str, Tensor], names: set[str]) -> float:
    """``|approx - exact| / |exact|`` over the parameters ``names``, flattened together."""
    difference = sum(float((approx[n] - exact[n]).square().sum()) for n in names)
    norm = sum(float(exact[n].square().sum()) for n in names)
    return (difference / norm) ** 0.5


def inputs(name: str, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A fixed random batch of images for net ``name``, and fixed random labels."""
    generator = torch.Generator().manual_seed(0)
    size = NETS[name][0]
    x = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return x.to(device), labels.to(device)


def gradient_errors(
    name: str, method: str, steps: float, batch: int, device: str
) -> dict[str, Any]:
    """The adjoint's relative gradient errors, whether the export warned, and the steps."""
    source = source_model(name)
    x, labels = inputs(name, batch, torch.device(device))
    exact = export_neural_ode(source, method=method, steps=steps, gradient="backprop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adjoint = export_neural_ode(source, method=method, steps=steps, gradient="adjoint")
    reference = gradients(exact.to(device), x, labels)
    approx = gradients(adjoint.to(device), x, labels)
    return {
        "steps per stage": "/".join(
            str(m.steps) for m in exact.modules() if isinstance(m, NeuralODEStage)
        ),
        "stage": relative_error(approx, reference, stage_parameters(exact)),
        "all": relative_error(approx, reference, set(reference)),
        "warns": bool(caught),
    }


def step_cost(
    name: str, method: str, steps: float, gradient: str, batch: int, device: str, repeats: int
) -> dict[str, float]:
    """Peak memory and time of one training step of the export (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = export_neural_ode(source_model(name), method=method, steps=steps, gradient=gradient)
    x, _ = inputs(name, batch, torch.device(device))
    return measure_step(model.to(device), x, repeats=repeats)


def measure(name: str, device: str, batch: int, repeats: int) -> list[dict]:
    """One row per method and number of steps of net ``name``. On CPU every gradient and every
    memory measurement runs in a fresh forked process, so that this one's heap stays clean."""

    def run(function: Callable[..., T], *args: Any) -> T:
        return function(*args) if device == "cuda" else in_fresh_process(function, *args)

    rows = []
    for method in METHODS:
        for label in NETS[name][1]:
            steps = STEPS[label]
            started = time.perf_counter()
            errors = run(gradient_errors, name, method, steps, batch, device)
            cost = {
                gradient: run(step_cost, name, method, steps, gradient, batch, device, repeats)
                for gradient in ("adjoint", "backprop")
            }
            rows.append(
                {
                    "net": name,
                    "method": method,
                    "steps": f"{label} ({errors['steps per stage']})",
                    "rel. error, stage parameters": f"{errors['stage']:.1e}",
                    "rel. error, all parameters": f"{errors['all']:.1e}",
                    "warns": "yes" if errors["warns"] else "no",
                    "adjoint peak MiB": round(cost["adjoint"]["peak_bytes"] / 2**20, 2),
                    "backprop peak MiB": round(cost["backprop"]["peak_bytes"] / 2**20, 2),
                    "adjoint ms": round(cost["adjoint"]["seconds"] * 1e3, 1),
                    "backprop ms": round(cost["backprop"]["seconds"] * 1e3, 1),
                }
            )
            print(rows[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="memory and time measurements")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows = [
        row for name in args.nets for row in measure(name, args.device, args.batch, args.repeats)
    ]
    env = environment(args.device)
    notes = (
        f"float64, batch {args.batch}, cross-entropy against fixed random labels. Exact: "
        f"gradient='backprop' of the same export (same method and steps). Memory: peak of one "
        f"training step above the memory before it ("
        + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "CPU peak-RSS proxy")
        + f"), min over {args.repeats}; time: median of {args.repeats}. 'warns': the export "
        f"warned that the adjoint is inexact for this net and method."
    )
    name = "adjoint" if args.device == "cpu" else f"adjoint_{args.device}"
    path = write_results(name, env, rows, list(rows[0]), notes)
    payload = {"environment": env, "arguments": vars(args), "rows": rows, "notes": notes}
    atomic_write_text(json.dumps(payload, indent=2) + "\n", RESULTS / f"{name}.json")
    print(path.read_text())


if __name__ == "__main__":
    main()
