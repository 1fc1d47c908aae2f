"""The error of the checkpoint reader, and how it words what went wrong."""

from __future__ import annotations

import re
from pathlib import Path

UNREADABLE = "is not a readable PyTorch checkpoint (truncated or another format)"
"""What a damaged or foreign file is, after its name."""
_UNSAFE_ADVICE = re.compile(r"weights.only|trust the source|arbitrary code|safe_globals", re.I)


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for the model at hand."""


def failure(path: Path, what: str, error: Exception) -> CheckpointError:
    """The error to raise for ``error`` while reading ``path``: ``path what: reason``, or the
    out-of-memory error for a ``MemoryError``."""
    if isinstance(error, MemoryError):
        return out_of_memory(path)
    return CheckpointError(f"{path} {what}: {reason(error)}")


def out_of_memory(path: Path) -> CheckpointError:
    """The error for a file whose reading ran out of memory."""
    return CheckpointError(
        f"{path} could not be loaded: out of memory while reading it; free memory or raise "
        f"the process's memory limit, then retry"
    )


def reason(error: BaseException) -> str:
    """An error's text on one line, without torch's advice to load the file unsafely."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not _UNSAFE_ADVICE.search(line)]
    return "; ".join(kept) or type(error).__name__
