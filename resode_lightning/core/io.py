"""Safe checkpoint loading (weights only, never arbitrary pickles) and atomic file writes."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch
from torch import Tensor, nn

from resode_lightning.core.odeform import convert_stage, unconvert_stage
from resode_lightning.core.stages import MARKER, find_stages

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for the model at hand."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a torchvision ``.pth``, Lightning ``.ckpt`` or ``.safetensors`` file.

    Files are read with ``torch.load(..., weights_only=True)``: a file carrying any pickled
    object other than tensors and plain containers is refused and nothing in it is executed.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is truncated, not a checkpoint, carries a pickle payload, or
            holds no mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        globals_refused = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        if not globals_refused:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (truncated or another format)"
            ) from None
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors and plain containers, so it was "
            f"refused without executing anything ({globals_refused[0]}). Re-save only the "
            f"weights, e.g. torch.save(model.state_dict(), path)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another format): {error}"
        ) from None
    return _extract_state_dict(content, path)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file: pip install safetensors to read it"
        ) from None
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def _extract_state_dict(content: object, path: Path) -> dict[str, Tensor]:
    if isinstance(content, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not content:
        raise CheckpointError(
            f"{path} holds {type(content).__name__}, not a state dict (a mapping of parameter "
            f"names to tensors, or a Lightning checkpoint with a 'state_dict' entry)"
        )
    tensors = {key: value for key, value in content.items() if isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds a mapping with no tensors; it is not a state dict")
    return tensors


def strip_prefix(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Drop the module prefix (``model.``, ``module.``, ...) that best matches ``model``'s keys."""
    expected = set(model.state_dict()) | {
        k for k in state_dict if k.rsplit(".", 1)[-1].startswith(MARKER)
    }
    candidates = {""}
    for key in state_dict:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))

    def matches(prefix: str) -> int:
        return sum(k.startswith(prefix) and k[len(prefix) :] in expected for k in state_dict)

    best = max(sorted(candidates, key=len), key=matches)
    if not best:
        return dict(state_dict)
    return {k[len(best) :]: v for k, v in state_dict.items() if k.startswith(best)}


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``, adopting the ODE form its markers record.

    Stages whose marker is present are converted to ODE form with the stored horizon before
    loading; stages without one are returned to the plain form. A prefix such as ``model.``
    (Lightning) or ``module.`` (DDP) is stripped.

    Raises:
        CheckpointError: the keys do not match the model; the message lists missing and
            unexpected keys.
    """
    state_dict = strip_prefix(state_dict, model)
    try:
        stages = find_stages(model)
    except ValueError:
        stages = []
    prefix_of = {id(module): f"{name}." if name else "" for name, module in model.named_modules()}
    for stage in stages:
        key = prefix_of[id(stage.container)] + stage.marker
        if key in state_dict:
            horizon = float(state_dict[key])
            if stage.is_ode_form and stage.horizon != horizon:
                unconvert_stage(stage)
            convert_stage(stage, horizon)
        else:
            unconvert_stage(stage)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {type(model).__name__} (another architecture or number "
            f"of classes?): {len(missing)} missing key(s) {_head(missing)}, {len(unexpected)} "
            f"unexpected key(s) {_head(unexpected)}"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {error}") from None
    return model


def _head(keys: list[str], count: int = 8) -> str:
    shown = ", ".join(keys[:count])
    return f"[{shown}{', ...' if len(keys) > count else ''}]"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(fileobj)`` so that it appears whole or not at all.

    The content goes to a temporary file beside ``path`` that replaces ``path`` only once it
    is complete; on any error the temporary file is removed and an existing ``path`` is left
    untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist"
        )
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _mode_for(path))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The replaced file's permissions, or what ``open()`` would give a new file (umask)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))
