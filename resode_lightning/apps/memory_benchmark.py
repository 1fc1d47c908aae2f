"""Peak memory and time of one training step (forward + backward) of a residual stage, by mode.

Modes (each a stage of ``steps`` torchvision ``BasicBlock``s of ``width`` channels, or its
export):

- ``plain``: the ResNet stage, trained as it is;
- ``odeform``: the same stage in ODE form (:func:`to_ode_form`), backprop;
- ``block_checkpoint``: the plain stage with ``torch.utils.checkpoint`` around every block;
- ``torchdiffeq_adjoint``: a hand-written torchdiffeq baseline: one conv-BN-relu-conv-BN field
  with shared weights, ``odeint_adjoint`` with Euler and ``steps`` steps;
- ``backprop``, ``checkpoint``, ``recursive`` (with :data:`RECURSIVE_CHECKPOINTS` stored
  states), ``adjoint``: :func:`export_neural_ode` of a stage of ``depth``
  blocks with that gradient mode, solved by Euler with ``steps`` steps (linear weight path,
  BatchNorm folded): the parameters stay fixed while the solver's steps grow, as for the
  torchdiffeq baseline. (With one knot per step instead, the parameters, their gradients and
  the adjoint's augmented state, which carries a copy of the parameter gradients, grow too.)

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the step minus the memory
allocated before it. On CPU, the rise of the process's peak resident memory during the step
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before; Linux
only), after ``malloc_trim(0)`` has returned glibc's free heap pages, so that every page the
step touches shows, and one thread (``torch.set_num_threads(1)``). The CPU figure is a proxy:
it also counts allocator fragmentation. A heap fragmented by earlier, larger measurements
inflates later ones (up to 2x measured at 4 to 64 steps after 256), so on CPU
:func:`memory_benchmark` measures each mode and number of steps in a forked child of the
calling process (:func:`in_fresh_process`), which starts from the same heap every time and
hands blocks of :data:`MMAP_THRESHOLD` bytes or more straight back to the system when they are
freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``, set in the child only), so that every tensor
counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchdiffeq import odeint_adjoint
from torchvision.models.resnet import BasicBlock

from resode_lightning.core.odeform import to_ode_form
from resode_lightning.export.build import export_neural_ode

MODES: tuple[str, ...] = (
    "plain",
    "odeform",
    "block_checkpoint",
    "torchdiffeq_adjoint",
    "backprop",
    "checkpoint",
    "recursive",
    "adjoint",
)
RECURSIVE_CHECKPOINTS = 4
"""Stored states of the ``recursive`` mode."""
MMAP_THRESHOLD = 65536
"""Bytes from which a measuring child process maps each allocation on its own (see the module
docstring)."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
T = TypeVar("T")


class _BlockCheckpoint(nn.Module):
    def __init__(self, stage: nn.Sequential) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        for block in self.stage:
            x = checkpoint(block, x, use_reentrant=False)
        return x


class _SharedField(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.branch(x)


class _TorchdiffeqAdjoint(nn.Module):
    def __init__(self, width: int, steps: int) -> None:
        super().__init__()
        self.field = _SharedField(width)
        self.steps = steps

    def forward(self, x: Tensor) -> Tensor:
        t = torch.tensor([0.0, 1.0], device=x.device)
        options = {"step_size": 1.0 / self.steps}
        return odeint_adjoint(self.field, x, t, method="euler", options=options)[-1]


class _Wrapper(nn.Module):
    def __init__(self, stage: nn.Sequential) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(x)


def stage_module(mode: str, steps: int, width: int, depth: int = 4) -> nn.Module:
    """The module one training step of ``mode`` runs, on CPU (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "torchdiffeq_adjoint":
        return _TorchdiffeqAdjoint(width, steps)
    blocks = depth if mode in ("backprop", "checkpoint", "recursive", "adjoint") else steps
    stage = nn.Sequential(*[BasicBlock(width, width) for _ in range(blocks)])
    if mode == "plain":
        return stage
    if mode == "odeform":
        return to_ode_form(_Wrapper(stage)).stage
    if mode == "block_checkpoint":
        return _BlockCheckpoint(stage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # adjoint on post-activation blocks
        checkpoints = RECURSIVE_CHECKPOINTS if mode == "recursive" else None
        exported = export_neural_ode(
            _Wrapper(stage).eval(), gradient=mode, steps=steps, checkpoints=checkpoints
        )
        return exported.stage


def _proc_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def _mmap_large_blocks() -> bool:
    """Make glibc map every allocation of :data:`MMAP_THRESHOLD` bytes or more on its own, so
    that freeing it returns it to the system; ``False`` where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system, so that reusing them shows in the RSS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the proxy underestimates
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Bytes by which the peak memory during ``step()`` exceeds the memory before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_bytes("VmRSS")
    step()
    return _proc_bytes("VmHWM") - before


def peak_allocated_bytes(step: Callable[[], None]) -> int:
    """Bytes by which the tensors alive during ``step()`` exceed, at their peak, those alive
    before it, from the profiler's CPU memory events: the counterpart of
    ``torch.cuda.max_memory_allocated`` on CPU, without the proxy's allocator fragmentation
    and host-side objects (and slower: every allocation is recorded)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        step()
    events = profiler.profiler.kineto_results.events()
    changes = sorted(
        (event.start_ns(), index, event.nbytes())
        for index, event in enumerate(events)
        if event.name() == "[memory]"
    )
    live = peak = 0
    for *_, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def allocated_step_bytes(
    mode: str, steps: int, *, width: int = 16, size: int = 16, batch: int = 8, depth: int = 4
) -> int:
    """:func:`peak_allocated_bytes` of one training step of ``mode`` on CPU, after a warm-up
    step (the input as in :func:`memory_benchmark`)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, size, size, generator=generator).relu().requires_grad_(True)
    torch.manual_seed(0)
    module = stage_module(mode, steps, width, depth)

    def step() -> None:
        module(x).square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    step()
    return peak_allocated_bytes(step)


def in_fresh_process(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` run in a forked child process; returns its result.

    The child starts from this process's heap, untouched by the measurements made in other
    children, and maps large blocks on their own (:func:`_mmap_large_blocks`); this process's
    allocator is left as it is. CPU only (a forked child cannot use CUDA); Linux, like the CPU
    memory proxy.
    """
    with multiprocessing.get_context("fork").Pool(1, initializer=_mmap_large_blocks) as pool:
        return pool.apply(function, args, kwargs)


def _measure_cell(
    mode: str, steps: int, width: int, depth: int, x: Tensor, repeats: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    module = stage_module(mode, steps, width, depth).to(x.device)
    result = measure_step(module, x, repeats=repeats)
    parameters = sum(p.numel() for p in module.parameters())
    return {"mode": mode, "steps": steps, "parameters": parameters, **result}


def measure_step(
    module: nn.Module, x: Tensor, *, repeats: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Peak memory (min over ``repeats``) and median time of one forward + backward of ``module``.

    Returns:
        ``{"peak_bytes": ..., "seconds": ...}``.
    """
    x = x.detach().requires_grad_(True)

    def step() -> None:
        module(x).square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(warmup):
        step()
    peaks, times = [], []
    for _ in range(repeats):
        peaks.append(peak_step_bytes(step, x.device))
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        started = time.perf_counter()
        step()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - started)
    return {"peak_bytes": float(min(peaks)), "seconds": statistics.median(times)}


def memory_benchmark(
    steps: Sequence[int] = (4, 8, 16, 32, 64, 128, 256),
    modes: Sequence[str] = MODES,
    *,
    width: int = 16,
    size: int = 16,
    batch: int = 8,
    depth: int = 4,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every mode at every number of steps; returns rows plus the summary ratios.

    On CPU each mode and number of steps is measured in its own forked child process (see the
    module docstring).
    """
    device = torch.device(device)
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise ValueError(
            "the CPU memory proxy needs Linux (/proc/self/clear_refs); use --device cuda"
        )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, size, size, generator=generator).relu().to(device)
    rows = []
    for mode in modes:
        for count in steps:
            cell = (mode, count, width, depth, x, repeats)
            row = (
                _measure_cell(*cell)
                if device.type == "cuda"
                else in_fresh_process(_measure_cell, *cell)
            )
            rows.append(row)
            if log is not None:
                log(
                    f"{mode:>20} {count:>4} steps: {row['peak_bytes'] / 2**20:8.2f} MiB "
                    f"{row['seconds'] * 1e3:9.2f} ms"
                )
    state_bytes = x.numel() * x.element_size()
    return {
        "device": str(device),
        "width": width,
        "size": size,
        "batch": batch,
        "depth": depth,
        "threads": torch.get_num_threads(),
        "state_bytes": state_bytes,
        "rows": rows,
        "ratios": summary_ratios(rows, state_bytes),
        "mmap_threshold": MMAP_THRESHOLD if device.type == "cpu" else None,
    }


def summary_ratios(rows: list[dict[str, Any]], state_bytes: int) -> dict[str, float]:
    """The issue's goals: adjoint peak at most/least steps, and per-step growth in state tensors.

    ``<mode>_growth_states_per_step`` is the least-squares slope of peak memory against steps,
    divided by the bytes of one state tensor.
    """
    ratios: dict[str, float] = {}
    for mode in sorted({row["mode"] for row in rows}):
        mine = sorted((row["steps"], row["peak_bytes"]) for row in rows if row["mode"] == mode)
        if len(mine) < 2:
            continue
        steps = torch.tensor([s for s, _ in mine], dtype=torch.float64)
        peaks = torch.tensor([p for _, p in mine], dtype=torch.float64)
        centered = steps - steps.mean()
        slope = float((centered * (peaks - peaks.mean())).sum() / centered.square().sum())
        ratios[f"{mode}_growth_states_per_step"] = slope / state_bytes
        ratios[f"{mode}_peak_ratio_max_over_min_steps"] = float(peaks[-1] / peaks[0])
    return ratios
