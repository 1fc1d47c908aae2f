"""``RunIf``: one skip marker for what a test needs from the machine, as Lightning's own tests do.

@RunIf(cuda=True)
def test_on_gpu(): ...

@RunIf(timm=True, onnxruntime=True)
def test_timm_model_through_onnx(): ...
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

OPTIONAL = {
    "timm": "timm",
    "onnxruntime": "onnxruntime",
    "lightning": "lightning.pytorch",
}
"""The optional packages a test may need, by keyword of :func:`RunIf`."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def RunIf(  # noqa: N802 (a marker factory, named as Lightning's)
    *,
    cuda: bool = False,
    no_cuda: bool = False,
    timm: bool = False,
    onnxruntime: bool = False,
    lightning: bool = False,
    not_root: bool = False,
) -> pytest.MarkDecorator:
    """A ``skipif`` marker that skips the test unless the machine has everything asked for.

    Args:
        cuda: a CUDA device.
        no_cuda: no CUDA device (a test of what happens without one).
        timm, onnxruntime, lightning: the optional package (``lightning`` is the unified
            ``lightning.pytorch``, beside ``pytorch_lightning``).
        not_root: a user other than root (file permissions are enforced).
    """
    reasons = []
    if cuda and not torch.cuda.is_available():
        reasons.append("CUDA")
    if no_cuda and torch.cuda.is_available():
        reasons.append("a machine without CUDA")
    wanted = {"timm": timm, "onnxruntime": onnxruntime, "lightning": lightning}
    reasons += [
        name for name, needed in wanted.items() if needed and not _installed(OPTIONAL[name])
    ]
    if not_root and hasattr(os, "geteuid") and os.geteuid() == 0:
        reasons.append("a user other than root")
    return pytest.mark.skipif(bool(reasons), reason=f"needs {', '.join(reasons)}")
