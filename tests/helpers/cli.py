"""What a user of the ``resode`` command relies on when it refuses an input."""

from __future__ import annotations

from typing import Any


def one_line_error(output: Any, command: str, *parts: object) -> str:
    """The one stderr line of a refused ``resode COMMAND``, checked to name every part and to
    hold no traceback; returns it."""
    lines = output.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"resode {command}: error: "), output.err
    assert "Traceback" not in output.err and "weights_only" not in output.err
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]
