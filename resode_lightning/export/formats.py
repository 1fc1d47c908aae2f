"""Deployment artifacts of an export: a ``torch.export`` program, ONNX or TorchScript.

Each artifact is made from :func:`~resode_lightning.deployable` at the export's (or a given)
method and steps, read back from its own bytes and run on a probe batch before it is handed
out, so an artifact that does not compute the export is never written. The batch size is
dynamic in ``pt2`` and ``onnx``, and so are
height and width where the model allows.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FORMATS: dict[str, str] = {
    "pt": "the neural ODE file (load_neural_ode; trainable, any steps at run time)",
    "pt2": "a torch.export program at the chosen steps (torch.export.load)",
    "onnx": "an ONNX model at the chosen steps (needs onnx, onnxscript and onnxruntime)",
    "torchscript": "a traced TorchScript module at the chosen steps (torch.jit.load)",
}
"""The formats ``resode export --format`` writes, and what each is."""
TOLERANCE = 1e-4
"""The largest relative difference to eager an artifact may show on the probe."""


@dataclass(frozen=True)
class Artifact:
    """A serialised program and how far its output on the probe is from eager."""

    format: str
    data: bytes
    error: float


def program_artifact(program: nn.Module, format: str, probe: Tensor) -> Artifact:
    """Serialise a deployable program in ``format`` and check it on ``probe``.

    Args:
        program: a model returned by :func:`~resode_lightning.deployable` (eval mode).
        format: ``"pt2"``, ``"onnx"`` or ``"torchscript"``.
        probe: an input batch (at least 2 images; the batch size stays dynamic).

    Returns:
        The artifact's bytes and its relative error to ``program(probe)``.

    Raises:
        ValueError: an unknown format; the artifact does not reproduce ``program`` within
            :data:`TOLERANCE` (or gives non-finite values); ONNX packages missing.
    """
    writers = {"pt2": _pt2, "onnx": _onnx, "torchscript": _torchscript}
    if format not in writers:
        raise ValueError(f"format must be one of {sorted(writers)} for a program, got {format!r}")
    program = program.eval()
    with torch.no_grad():
        expected = program(probe)
        data, actual = writers[format](program, probe)
    error = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    if not error <= TOLERANCE:
        raise ValueError(
            f"the {format} artifact computes {error:.2g} (relative) away from the model on a "
            f"probe batch, above {TOLERANCE:g}: nothing was written"
        )
    return Artifact(format, data, error)


def _dynamic_shapes() -> dict[str, dict[int, object]]:
    """Batch size, height and width left to the program (``Dim.AUTO``: dynamic where the
    model allows it)."""
    return {"x": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}


def _pt2(program: nn.Module, probe: Tensor) -> tuple[bytes, Tensor]:
    exported = torch.export.export(program, (probe,), dynamic_shapes=_dynamic_shapes())
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    loaded = torch.export.load(io.BytesIO(buffer.getvalue()))
    return buffer.getvalue(), loaded.module()(probe)


def _onnx(program: nn.Module, probe: Tensor) -> tuple[bytes, Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(
            "--format onnx needs onnx, onnxscript and onnxruntime: pip install "
            "'resode-lightning[onnx]'"
        ) from None
    onnx_program = torch.onnx.export(
        program, (probe,), dynamo=True, dynamic_shapes=_dynamic_shapes(), verbose=False
    )
    data = onnx_program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: probe.cpu().numpy()})
    return data, torch.from_numpy(output).to(probe.device)


def _torchscript(program: nn.Module, probe: Tensor) -> tuple[bytes, Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        traced = torch.jit.trace(program, (probe,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    return buffer.getvalue(), loaded(probe)
