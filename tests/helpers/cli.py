"""What a user of the ``resode`` command relies on when it refuses an input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from resode_lightning import ode_resnet


def one_line_error(output: Any, command: str, *parts: object) -> str:
    """The one stderr line of a refused ``resode COMMAND``, checked to name every part and to
    hold no traceback; returns it."""
    lines = output.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"resode {command}: error: "), output.err
    assert "Traceback" not in output.err and "weights_only" not in output.err
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]


def distill_command(tmp_path: Path, *extra: str) -> list[str]:
    """A fast ``resode distill`` of a tiny ODE-ResNet on the 8x8 digits, with ``extra``."""
    weights = tmp_path / "net.pth"
    if not weights.exists():
        net = ode_resnet(depths=(4,), widths=(4,), in_channels=1, seed=0)
        torch.save(net.state_dict(), weights)
    return [
        "distill",
        "--arch",
        "ode_resnet",
        "--arch-kwargs",
        '{"depths": [4], "widths": [4]}',
        "--weights",
        str(weights),
        "--data",
        "digits",
        "--image-size",
        "8",
        "--epochs",
        "1",
        "--steps",
        "1.0",
        "0.5",
        "--lr",
        "0.001",
        "--out",
        str(tmp_path / "ode.pt"),
        "--no-progress",
        *extra,
    ]
