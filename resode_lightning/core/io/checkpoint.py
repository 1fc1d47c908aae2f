"""The safe checkpoint reader: weights only, sizes checked before anything is allocated.

Every field of a checkpoint is treated as hostile. Before ``torch.load(..., weights_only=True)``
reads a file, its zip directory is checked against the file size and its pickle is replayed on
placeholders (:mod:`~resode_lightning.core.io.pickle_scan`): only dense tensors and plain
containers are accepted, nothing is called, and every tensor must fit in the bytes its storage
declares, every storage in the record that holds it. This is the package's only ``torch.load``.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from resode_lightning.core.io.errors import (
    UNREADABLE,
    CheckpointError,
    failure,
    out_of_memory,
)
from resode_lightning.core.io.pickle_scan import PickleScan

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
_LEGACY_STORAGE_HEADER = 8  # the element count written before each storage's bytes
_INTEGER_BUFFERS = frozenset({"num_batches_tracked"})
"""Names (last part of a key) of the buffers a safetensors file may store as integers."""
_SAFETENSORS_FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_SAFETENSORS_INTEGERS = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a torchvision ``.pth``, Lightning ``.ckpt`` or ``.safetensors`` file.

    Nothing in the file is executed and nothing is allocated before its declared sizes are
    checked: a file whose pickle names anything but tensors and plain containers, whose
    records are compressed or larger than the file, or whose tensors claim more elements than
    their storage holds (zero-stride or expanded tensors) is refused. The memory taken grows
    with the file's size, never with the sizes it declares. Tensors that share memory are
    refused (see :func:`safe_torch_load`). A safetensors file is refused when its header
    repeats a key, or stores a tensor other than a known integer buffer (``num_batches_tracked``)
    with a dtype that is not floating point: weights are floats, and integer ones would be
    cast silently.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file cannot be read, is truncated, not a checkpoint, carries a
            pickle payload or declares sizes it does not hold, holds no mapping of string
            names to tensors, or does not fit in memory. The message names the file.
    """
    path = _existing(path)
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
        return state_dict_in(safe_torch_load(path), path)
    except MemoryError:
        raise out_of_memory(path) from None


def safe_torch_load(path: str | os.PathLike, *, data: bytes | None = None) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, once the file's declared sizes are
    checked (see :func:`load_state_dict_file`).

    Tensors whose memory overlaps (the same tensor under two keys, or overlapping views of one
    storage) are refused rather than copied apart: loaded with ``assign=True`` or used as they
    are, they would stay aliased (an optimizer step on one changing the other), and copying
    them apart would take memory the file does not hold. Views of disjoint parts of one
    storage are accepted; strided views are compared by the span from their first to their
    last element, so interleaved ones count as overlapping.

    Args:
        path: the file; it names the file in messages when ``data`` is given.
        data: the file's bytes, read instead of the file: a file checked before it is written.

    Raises:
        FileNotFoundError: the file does not exist (``data`` not given).
        CheckpointError: the file cannot be read, is damaged or forged, is not a
            ``torch.save`` file of tensors and plain containers, holds tensors that share
            memory, or does not fit in memory. The message names the file.
    """
    path = Path(path) if data is not None else _existing(path)
    try:
        content = _checked_torch_load(path, data)
    except MemoryError:
        raise out_of_memory(path) from None
    _refuse_aliases(content, path)
    return content


def state_dict_in(content: object, path: Path) -> dict[str, Tensor]:
    """The state dict a checkpoint's ``content`` holds: itself, or its entry ``state_dict``
    (Lightning), ``model_state_dict`` or ``model``; its tensors only.

    Raises:
        CheckpointError: ``content`` holds no mapping of string names to tensors; the message
            names the file ``path``.
    """
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
    check_keys(tensors, str(path))
    return tensors


def check_keys(state_dict: Mapping[object, object], source: str) -> None:
    """Raise ``CheckpointError`` (naming ``source``) unless the keys of ``state_dict`` are
    strings."""
    key = next((key for key in state_dict if not isinstance(key, str)), None)
    if key is not None:
        raise CheckpointError(
            f"{source} has a key {key!r} of type {type(key).__name__}; the keys of a state dict "
            f"are parameter names (strings)"
        )


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    return path


def _checked_torch_load(path: Path, data: bytes | None) -> object:
    """``torch.load`` of ``path`` (or of its bytes ``data``) once its declared sizes are checked."""
    if data is None:
        try:
            size = path.stat().st_size
            with open(path, "rb") as file:
                head = file.read(len(_ZIP_MAGIC))
        except OSError as error:
            raise CheckpointError(f"{path} cannot be read: {error.strerror}") from None
    else:
        size, head = len(data), data[: len(_ZIP_MAGIC)]
    if size == 0:
        raise CheckpointError(f"{path} is empty")
    if head == _ZIP_MAGIC:
        _check_zip_checkpoint(path, data, size)
    else:
        _check_legacy_checkpoint(path, data, size)
    try:
        source = path if data is None else io.BytesIO(data)
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types on damaged files
        raise failure(path, UNREADABLE, error) from None


def _named_tensors(content: object) -> list[tuple[str, Tensor]]:
    """Every tensor in the containers of ``content``, named by its path of keys (``a/b/0``).

    Each container is walked once, however often the pickle refers to it (a few shared lists
    nested a few levels deep would otherwise make the walk exponential in the file's size).
    """
    found, pending, seen = [], [("", content)], set()
    while pending:  # iterative: a pickle may nest containers deeper than Python's stack
        name, value = pending.pop()
        if isinstance(value, Tensor):
            found.append((name, value))
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, Mapping):
            pending.extend((f"{name}/{key}" if name else str(key), v) for key, v in value.items())
        elif isinstance(value, (list, tuple)):
            pending.extend((f"{name}/{index}", v) for index, v in enumerate(value))
    return found


def _refuse_aliases(content: object, path: Path) -> None:
    """Raise ``CheckpointError`` naming two tensors of ``content`` whose memory overlaps."""
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for name, tensor in _named_tensors(content):
        if tensor.numel() == 0:
            continue
        last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        start = tensor.storage_offset() * tensor.element_size()
        stop = start + (last + 1) * tensor.element_size()
        spans.setdefault(tensor.untyped_storage().data_ptr(), []).append((start, stop, name))
    for extents in spans.values():
        end, owner = 0, ""
        for start, stop, name in sorted(extents):
            if start < end:
                raise CheckpointError(
                    f"{path} holds tensors {owner!r} and {name!r} that share memory, so "
                    f"changing one would change the other; refused. Re-save them as separate "
                    f"tensors, e.g. {{k: v.clone() for k, v in state_dict.items()}}"
                )
            if stop > end:
                end, owner = stop, name


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file: pip install safetensors to read it"
        ) from None
    _check_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise failure(path, "is not a readable safetensors file", error) from None


def _check_safetensors_header(path: Path) -> None:
    """Refuse a safetensors file whose JSON header is larger than the file, repeats a key, or
    declares a weight that is not floating point (see :func:`load_state_dict_file`)."""
    unreadable = f"{path} is not a readable safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{unreadable}: it is {size} bytes long, too short")
            (length,) = struct.unpack("<Q", head)
            if not 0 < length <= size - 8:
                raise CheckpointError(
                    f"{unreadable}: it declares a {length:,}-byte header in a {size:,}-byte file"
                )
            header = json.loads(file.read(length), object_pairs_hook=_unique_keys(path))
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror}") from None
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as error:  # JSON or UTF-8 errors, or too deep nesting
        raise CheckpointError(f"{unreadable}: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{unreadable}: its header is not a JSON object")
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if name == "__metadata__" or not isinstance(dtype, str) or dtype in _SAFETENSORS_FLOATS:
            continue  # malformed entries are refused by safetensors itself
        if dtype not in _SAFETENSORS_INTEGERS or name.rsplit(".", 1)[-1] not in _INTEGER_BUFFERS:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype!r}; weights must be floating point "
                f"({', '.join(sorted(_SAFETENSORS_FLOATS))}), and only integer buffers such as "
                f"num_batches_tracked may be integers; re-save the weights as floats"
            )


def _unique_keys(path: Path) -> Callable[[list[tuple[str, object]]], dict[str, object]]:
    """A ``json.loads`` ``object_pairs_hook`` refusing an object that repeats a key."""

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen = Counter(key for key, _ in pairs)
        repeated = next((key for key, count in seen.items() if count > 1), None)
        if repeated is not None:
            raise CheckpointError(
                f"{path} repeats the key {repeated!r} in its safetensors header, so one of "
                f"its values would be dropped silently; refused"
            )
        return dict(pairs)

    return unique


def _check_zip_checkpoint(path: Path, data: bytes | None, size: int) -> None:
    """Refuse a ``torch.save`` zip whose records or pickle declare more than the file holds."""
    try:
        with zipfile.ZipFile(path if data is None else io.BytesIO(data)) as archive:
            records = _stored_records(archive, path, size)
            prefix = records[0].filename.split("/", 1)[0] + "/"
            names = {record.filename: record for record in records}
            if f"{prefix}constants.pkl" in names:
                raise CheckpointError(
                    f"{path} is a TorchScript archive (torch.jit.save), not a state dict; load it "
                    f"with torch.jit.load if you trust it, or save model.state_dict() instead"
                )
            if f"{prefix}data.pkl" not in names:
                raise CheckpointError(f"{path} {UNREADABLE}: a zip archive without data.pkl")
            data = archive.read(f"{prefix}data.pkl")
    except CheckpointError:
        raise
    except Exception as error:  # zipfile raises many types on damaged archives
        raise failure(path, UNREADABLE, error) from None
    scan = PickleScan(path, legacy=False)
    scan.replay(io.BytesIO(data))
    for key, storage in scan.storages.items():
        record = names.get(f"{prefix}data/{key}")
        if record is None:
            raise CheckpointError(f"{path} {UNREADABLE}: tensor data record {key!r} is missing")
        if record.file_size != storage.nbytes:
            raise CheckpointError(
                f"{path} declares {storage.nbytes:,} bytes for tensor data record {key!r}, "
                f"which holds {record.file_size:,} bytes; the file is damaged or forged"
            )


def _stored_records(archive: zipfile.ZipFile, path: Path, size: int) -> list[zipfile.ZipInfo]:
    """The archive's entries, refused unless stored uncompressed and inside the file."""
    records = archive.infolist()
    if not records or "/" not in records[0].filename:
        raise CheckpointError(f"{path} {UNREADABLE}: a zip archive but not a torch.save one")
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path} holds a compressed record {record.filename!r} ({record.compress_size:,} "
                f"bytes declared to expand to {record.file_size:,}); torch.save never compresses, "
                f"so it was refused without expanding it"
            )
        if record.file_size != record.compress_size or record.flag_bits & 0x1:
            raise CheckpointError(f"{path} {UNREADABLE}: record {record.filename!r} is damaged")
        if record.header_offset + record.file_size > size:
            raise CheckpointError(
                f"{path} declares a record {record.filename!r} of {record.file_size:,} bytes "
                f"beyond the end of the {size:,}-byte file"
            )
    declared = sum(record.file_size for record in records)
    if declared > size:
        raise CheckpointError(
            f"{path} declares {declared:,} bytes of records in a {size:,}-byte file; "
            f"the file is damaged or forged"
        )
    return records


def _check_legacy_checkpoint(path: Path, data: bytes | None, size: int) -> None:
    """Refuse a legacy (pre-zip) ``torch.save`` file whose storages declare more than it holds."""
    scan = PickleScan(path, legacy=True)
    with _view(path, data) as view:
        if scan.replay(view) != _LEGACY_MAGIC or scan.replay(view) != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path} {UNREADABLE}")
        scan.replay(view)  # system information
        scan.replay(view)  # the saved object
        keys = scan.replay(view)
        left = size - view.tell()
    if not isinstance(keys, list):
        raise CheckpointError(f"{path} {UNREADABLE}: no list of storages")
    needed = sum(_LEGACY_STORAGE_HEADER + storage.nbytes for storage in scan.storages.values())
    if needed > left:
        raise CheckpointError(
            f"{path} declares {needed:,} bytes of tensor data but holds {left:,} after its "
            f"pickle; it is truncated or forged, and was refused before allocating anything"
        )


@contextmanager
def _view(path: Path, data: bytes | None) -> Iterator[IO[bytes] | mmap.mmap]:
    """The file's bytes to read from the start: ``data``, or the file mapped in memory."""
    if data is not None:
        yield io.BytesIO(data)
        return
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        yield view
