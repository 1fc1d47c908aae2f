"""Latency of deployed exports against the source ResNet deployed the same way, arms interleaved.

For each model (torchvision's resnet50 and resnet152, and an ``ode_resnet`` with one stage of
16 blocks of width ``--width``, i.i.d. init; random weights with random BatchNorm statistics,
:func:`~resode_lightning.testing.randomize_norms`, eval mode) the arms are:

- ``source``: the source model itself;
- ``export, L``: :func:`~resode_lightning.deployable` of its export at Euler, each stage's
  depth in steps (``steps=1.0``): the same function as the source;
- ``export, L/2`` (the torchvision ResNets, ``steps=0.5``) or ``export, L/4`` (``ode_resnet``,
  ``steps=0.25``), Euler;
- ``export, RK4 L/4 evals`` (``ode_resnet`` only): RK4 at ``steps=1/16``, as many field
  evaluations as Euler at L/4.

Every arm goes through each toolchain, the source too:

- ``compile``: ``torch.compile(fullgraph=True)`` (inductor, default mode), compiled once and
  warmed up;
- ``onnx``: ``torch.onnx.export(dynamo=True)``, run by ONNX Runtime's CPU provider with one
  intra-op and one inter-op thread (CPU only).

Each artifact's output is compared with its arm run eagerly (relative L2 error); an artifact
above :data:`~resode_lightning.export.formats.TOLERANCE` is marked invalid and never meets a
target. After ``--warmup`` rounds, every round runs each (toolchain, arm) of a model once, in an
order rotated every round, so that all share the machine's drift; the figures are medians over
rounds, each ratio a ratio of medians of one run against the source in the same toolchain. On
CPU the CPU time of the computing thread (``time.thread_time``: PyTorch and ONNX Runtime both
compute in the calling thread with one thread) is recorded beside the wall-clock time; it leaves
out the time the process waits for a core on a shared machine. Targets (:data:`TARGETS`, on
wall-clock time; on CPU also on CPU time), per toolchain: every export at L <= 1.05x its source,
resnet152 at L/2 <= 0.60x, ``ode_resnet`` at L/4 <= 0.30x.

    python benchmarks/deploy.py [--models ...] [--toolchains compile onnx] [--rounds N]
    python benchmarks/deploy.py --device cuda --toolchains compile --size 224 --batch 64

Defaults: CPU with one thread, batch 8 of 64x64 images. On CUDA only ``compile`` runs (cuDNN
autotuned, TF32 off: float32 convolutions, so that the outputs can be checked against eager).
Writes ``--output`` (default ``benchmarks/results/deploy_{device}.json``) and a markdown table
beside it; both are rewritten after each model, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS, environment, markdown_table
from torch import Tensor, nn

from resode_lightning import deployable, export_neural_ode, ode_resnet
from resode_lightning.core.io.atomic import atomic_write_text
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.core.stages import find_stages
from resode_lightning.export.deploy import DeployedStage
from resode_lightning.export.formats import TOLERANCE
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.testing import randomize_norms

MODELS: tuple[str, ...] = ("resnet50", "resnet152", "ode_resnet")
TOOLCHAINS: tuple[str, ...] = ("compile", "onnx")
SOURCE = "source"
ARMS: dict[str, dict[str, tuple[float, str]]] = {
    "resnet50": {"export, L": (1.0, "euler"), "export, L/2": (0.5, "euler")},
    "resnet152": {"export, L": (1.0, "euler"), "export, L/2": (0.5, "euler")},
    "ode_resnet": {
        "export, L": (1.0, "euler"),
        "export, L/4": (0.25, "euler"),
        "export, RK4 L/4 evals": (1 / 16, "rk4"),
    },
}
"""The export arms of each model: (steps as a fraction of each stage's depth, method)."""
TARGETS: dict[str, dict[str, float]] = {
    "resnet50": {"export, L": 1.05},
    "resnet152": {"export, L": 1.05, "export, L/2": 0.60},
    "ode_resnet": {"export, L": 1.05, "export, L/4": 0.30},
}
"""Upper bounds on an arm's median latency / its source's, in the same toolchain."""
EXACT = 1e-5
"""Upper bound on the eager L-step program's relative L2 difference from the source's logits."""


def source_model(name: str, width: int) -> nn.Module:
    """The named model with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    if name == "ode_resnet":
        model = ode_resnet(depths=(16,), widths=(width,), init="iid", seed=0)
    else:
        model = torchvision_resnet(name)
    with torch.no_grad():
        randomize_norms(model, seed=0)
    return model.eval()


def programs(name: str, source: nn.Module) -> dict[str, nn.Module]:
    """The eager programs of every arm of model ``name``, the source first."""
    export = export_neural_ode(source)
    arms = {SOURCE: source}
    for arm, (steps, method) in ARMS[name].items():
        arms[arm] = deployable(export, steps=steps, method=method)
    return arms


def grid(program: nn.Module) -> tuple[str, int]:
    """Steps per stage ("/"-joined, "" for the source) and field evaluations per forward."""
    stages = [m for m in program.modules() if isinstance(m, DeployedStage)]
    steps = "/".join(str(stage.steps) for stage in stages)
    evaluations = sum(stage.steps * len(GRID_METHODS[stage.method]) for stage in stages)
    return steps, evaluations


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def compiled(program: nn.Module, x: Tensor, warmup: int) -> tuple[Callable[[], object], Tensor]:
    """``program`` through ``torch.compile`` (inductor, default mode, one graph), run once to
    compile and ``warmup`` more times; returns the call and its output on ``x``."""
    function = torch.compile(program, fullgraph=True)
    with torch.no_grad():
        output = function(x)
        for _ in range(warmup):
            function(x)

    def call() -> object:
        with torch.no_grad():
            return function(x)

    return call, output


def onnx_session(program: nn.Module, x: Tensor, warmup: int) -> tuple[Callable[[], object], Tensor]:
    """``program`` exported to ONNX (dynamo) and run by ONNX Runtime's CPU provider on one
    thread; returns the call and its output on ``x``."""
    import onnxruntime

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    data = onnx_program.model_proto.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    (output,) = session.run(None, feed)
    for _ in range(warmup):
        session.run(None, feed)
    return (lambda: session.run(None, feed)), torch.from_numpy(output)


BUILDERS = {"compile": compiled, "onnx": onnx_session}


def interleaved(
    calls: dict[tuple[str, str], Callable[[], object]], rounds: int, warmup: int, cuda: bool
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], list[float]]]:
    """Wall-clock and CPU seconds (of this thread) per call: one call of each per round, the
    order rotated every round."""
    keys = list(calls)
    wall: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    for round_ in range(warmup + rounds):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            sync()
            started, started_cpu = time.perf_counter(), time.thread_time()
            calls[key]()
            sync()
            if round_ >= warmup:
                wall[key].append(time.perf_counter() - started)
                cpu[key].append(time.thread_time() - started_cpu)
    return wall, cpu


def verdict(ratio: float, target: float | None, valid: bool) -> str:
    if target is None:
        return ""
    if not valid:
        return "INVALID"
    return "yes" if ratio <= target else "NO"


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    """One row per (toolchain, arm) of model ``name``."""
    device = torch.device(args.device)
    source = source_model(name, args.width)
    eager = {arm: program.to(device).eval() for arm, program in programs(name, source).items()}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    with torch.no_grad():
        expected = {arm: program(x) for arm, program in eager.items()}
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    build: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], float] = {}
    for toolchain in args.toolchains:
        for arm, program in eager.items():
            started = time.perf_counter()
            call, output = BUILDERS[toolchain](program, x, args.warmup)
            build[toolchain, arm] = time.perf_counter() - started
            calls[toolchain, arm] = call
            errors[toolchain, arm] = relative_error(output, expected[arm])
            print(
                f"{name} {toolchain} {arm}: built in {build[toolchain, arm]:.1f} s, "
                f"error vs eager {errors[toolchain, arm]:.1e}",
                flush=True,
            )
    started = time.perf_counter()
    wall, cpu = interleaved(calls, args.rounds, args.warmup, device.type == "cuda")
    print(f"{name}: timed in {time.perf_counter() - started:.0f} s", flush=True)
    depths = "/".join(str(stage.depth) for stage in find_stages(source))
    rows = []
    for toolchain in args.toolchains:
        base = statistics.median(wall[toolchain, SOURCE])
        cpu_base = statistics.median(cpu[toolchain, SOURCE])
        for arm, program in eager.items():
            key = (toolchain, arm)
            median = statistics.median(wall[key])
            quartiles = statistics.quantiles(wall[key], n=4) if len(wall[key]) > 1 else [median] * 3
            ratio = median / base
            cpu_ratio = statistics.median(cpu[key]) / cpu_base
            valid = errors[key] <= TOLERANCE
            target = TARGETS[name].get(arm)
            steps, evaluations = grid(program)
            versus_source = relative_error(expected[arm], expected[SOURCE])
            row = {
                "model": name,
                "stage depths L": depths,
                "toolchain": toolchain,
                "arm": arm,
                "steps per stage": steps,
                "evaluations": evaluations if arm != SOURCE else "",
                "median ms": round(1e3 * median, 2),
                "IQR ms": f"{1e3 * quartiles[0]:.2f}–{1e3 * quartiles[2]:.2f}",
                "ratio to source": round(ratio, 3),
                "target": "" if target is None else f"<= {target:.2f}",
                "met": verdict(ratio, target, valid),
            }
            if device.type == "cpu":
                row["CPU-time ratio"] = round(cpu_ratio, 3)
                row["met (CPU time)"] = verdict(cpu_ratio, target, valid)
            row["rel. error vs eager"] = f"{errors[key]:.1e}"
            row[f"valid (<= {TOLERANCE:g})"] = "yes" if valid else "NO"
            row["eager rel. diff. vs source"] = f"{versus_source:.1e}"
            exact = ""
            if arm == "export, L":
                exact = "yes" if versus_source <= EXACT else "NO"
            row[f"exact (<= {EXACT:g})"] = exact
            row["build s"] = round(build[key], 1)
            rows.append(row)
            print(row, flush=True)
    return rows


def target_lines(rows: list[dict]) -> list[str]:
    """One line per target: met or missed, with the ratio."""
    lines = []
    for row in rows:
        if not row["target"]:
            continue
        cpu = ""
        if "CPU-time ratio" in row:
            cpu = f"; CPU time {row['CPU-time ratio']:.3f}x: {row['met (CPU time)']}"
        state = {"yes": "met", "NO": "MISSED", "INVALID": "INVALID (wrong output)"}[row["met"]]
        lines.append(
            f"- {row['model']} {row['toolchain']} {row['arm']}: {row['ratio to source']:.3f}x "
            f"(target {row['target']}): {state}{cpu}"
        )
    return lines


def write(rows: list[dict], args: argparse.Namespace, env: dict, seconds: float) -> Path:
    """The JSON and the markdown table beside it; returns the markdown path."""
    notes = (
        f"Batch {args.batch} of {args.size}x{args.size} random images, float32, no_grad; "
        f"{args.rounds} rounds after {args.warmup} warm-up rounds, every (toolchain, arm) of a "
        f"model interleaved (order rotated each round); medians and interquartile ranges per "
        f"forward; ratios are of medians of this run, against the source in the same "
        f"toolchain. 'compile': torch.compile(fullgraph=True), inductor default mode (no "
        f"freezing: the source's BatchNorm stays unfolded, the exports fold theirs when they "
        f"are made). 'onnx': torch.onnx.export(dynamo=True), ONNX Runtime CPU provider, "
        f"default graph optimisations, intra_op_num_threads=1, inter_op_num_threads=1. "
        f"'rel. error vs eager': the artifact's relative L2 error to its arm run eagerly; "
        f"'valid' if <= {TOLERANCE:g}, else the arm meets no target. 'eager rel. diff. vs "
        f"source': the arm's eager logits against the source's (the L arm computes the same "
        f"function: 'exact'). 'build s': compile and first calls, or ONNX export and session "
        f"creation plus first calls (inductor's on-disk cache makes repeated compiles faster). "
        f"Whole run {seconds:.0f} s."
    )
    if args.device == "cpu":
        notes += (
            " 'CPU-time': the same ratio of medians of the CPU time of the (single) computing "
            "thread per forward instead of wall-clock time."
        )
        if hasattr(os, "getloadavg"):
            notes += f" 1-min load average {os.getloadavg()[0]:.1f} at the end."
    output = args.output or RESULTS / f"deploy_{args.device}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    targets = target_lines(rows)
    payload = {
        "environment": env,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(seconds, 1),
        "rows": rows,
        "targets": targets,
        "notes": notes,
    }
    atomic_write_text(json.dumps(payload, indent=2) + "\n", output)
    header = ", ".join(f"{k} {v}" for k, v in env.items())
    text = (
        f"{markdown_table(rows, list(rows[0]))}\nTargets:\n\n" + "\n".join(targets) + "\n\n"
        f"{header}\n\n{notes}\n"
    )
    return atomic_write_text(text, output.with_suffix(".md"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--toolchains", nargs="+", choices=TOOLCHAINS, default=None, help="CUDA: compile only"
    )
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls/rounds first")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument(
        "--width", type=int, default=16, help="channels of the ode_resnet (speed.py's: 16)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON path (default results/deploy_DEVICE.json)"
    )
    args = parser.parse_args()
    if args.toolchains is None:
        args.toolchains = list(TOOLCHAINS) if args.device == "cpu" else ["compile"]
    if args.device == "cuda" and args.toolchains != ["compile"]:
        parser.error("on CUDA only the compile toolchain runs: --toolchains compile")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False  # float32 convolutions: outputs are checked
        torch.backends.cuda.matmul.allow_tf32 = False
    started = time.perf_counter()
    env = environment(args.device)
    rows: list[dict] = []
    path = None
    for name in args.models:
        rows += measure(name, args)
        path = write(rows, args, env, time.perf_counter() - started)
    if path is not None:
        print(path.read_text())


if __name__ == "__main__":
    main()
