"""Safe checkpoint loading (weights only, sizes checked before anything is allocated) and
atomic file writes.

Every field of a checkpoint is treated as hostile. Before ``torch.load(..., weights_only=True)``
reads a file, its zip directory is checked against the file size and its pickle is replayed on
placeholders: only dense tensors and plain containers are accepted, nothing is called, and every
tensor must fit in the bytes its storage declares, every storage in the record that holds it.
"""

from __future__ import annotations

import _compat_pickle
import errno
import io
import json
import math
import mmap
import os
import pickle
import re
import secrets
import stat
import struct
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch
from torch import Tensor, nn

from resode_lightning.core.odeform import check_step, convert_stage, unconvert_stage
from resode_lightning.core.stages import MARKER, Stage, find_stages

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so leftovers of killed writes stay
    fcntl = None

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
_LEGACY_STORAGE_HEADER = 8  # the element count written before each storage's bytes
_UNREADABLE = "is not a readable PyTorch checkpoint (truncated or another format)"
_UNSAFE_ADVICE = re.compile(r"weights.only|trust the source|arbitrary code|safe_globals", re.I)
_INTEGER_BUFFERS = frozenset({"num_batches_tracked"})
"""Names (last part of a key) of the buffers a safetensors file may store as integers."""
_SAFETENSORS_FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_SAFETENSORS_INTEGERS = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for the model at hand."""


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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
        return _extract_state_dict(safe_torch_load(path), path)
    except MemoryError:
        raise _out_of_memory(path) from None


def safe_torch_load(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, once the file's declared sizes are
    checked (see :func:`load_state_dict_file`).

    Tensors whose memory overlaps (the same tensor under two keys, or overlapping views of one
    storage) are refused rather than copied apart: loaded with ``assign=True`` or used as they
    are, they would stay aliased (an optimizer step on one changing the other), and copying
    them apart would take memory the file does not hold. Views of disjoint parts of one
    storage are accepted; strided views are compared by the span from their first to their
    last element, so interleaved ones count as overlapping.

    Raises:
        CheckpointError: the file cannot be read, is damaged or forged, is not a
            ``torch.save`` file of tensors and plain containers, holds tensors that share
            memory, or does not fit in memory. The message names the file.
    """
    try:
        content = _checked_torch_load(path)
    except MemoryError:
        raise _out_of_memory(path) from None
    _refuse_aliases(content, path)
    return content


def _checked_torch_load(path: Path) -> object:
    """``torch.load`` of ``path`` once its declared sizes are checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(len(_ZIP_MAGIC))
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror}") from None
    if size == 0:
        raise CheckpointError(f"{path} is empty")
    if head == _ZIP_MAGIC:
        _check_zip_checkpoint(path, size)
    else:
        _check_legacy_checkpoint(path, size)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types on damaged files
        raise _failure(path, _UNREADABLE, error) from None


def _failure(path: Path, what: str, error: Exception) -> CheckpointError:
    """The error to raise for ``error`` while reading ``path``: ``path what: reason``, or the
    out-of-memory error for a ``MemoryError``."""
    if isinstance(error, MemoryError):
        return _out_of_memory(path)
    return CheckpointError(f"{path} {what}: {_reason(error)}")


def _out_of_memory(path: Path) -> CheckpointError:
    """The error for a file whose reading ran out of memory."""
    return CheckpointError(
        f"{path} could not be loaded: out of memory while reading it; free memory or raise "
        f"the process's memory limit, then retry"
    )


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


def _reason(error: BaseException) -> str:
    """An error's text on one line, without torch's advice to load the file unsafely."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not _UNSAFE_ADVICE.search(line)]
    return "; ".join(kept) or type(error).__name__


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
        raise _failure(path, "is not a readable safetensors file", error) from None


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


def _check_zip_checkpoint(path: Path, size: int) -> None:
    """Refuse a ``torch.save`` zip whose records or pickle declare more than the file holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = _stored_records(archive, path, size)
            prefix = records[0].filename.split("/", 1)[0] + "/"
            names = {record.filename: record for record in records}
            if f"{prefix}constants.pkl" in names:
                raise CheckpointError(
                    f"{path} is a TorchScript archive (torch.jit.save), not a state dict; load it "
                    f"with torch.jit.load if you trust it, or save model.state_dict() instead"
                )
            if f"{prefix}data.pkl" not in names:
                raise CheckpointError(f"{path} {_UNREADABLE}: a zip archive without data.pkl")
            data = archive.read(f"{prefix}data.pkl")
    except CheckpointError:
        raise
    except Exception as error:  # zipfile raises many types on damaged archives
        raise _failure(path, _UNREADABLE, error) from None
    scan = _PickleScan(path, legacy=False)
    scan.replay(io.BytesIO(data))
    for key, storage in scan.storages.items():
        record = names.get(f"{prefix}data/{key}")
        if record is None:
            raise CheckpointError(f"{path} {_UNREADABLE}: tensor data record {key!r} is missing")
        if record.file_size != storage.nbytes:
            raise CheckpointError(
                f"{path} declares {storage.nbytes:,} bytes for tensor data record {key!r}, "
                f"which holds {record.file_size:,} bytes; the file is damaged or forged"
            )


def _stored_records(archive: zipfile.ZipFile, path: Path, size: int) -> list[zipfile.ZipInfo]:
    """The archive's entries, refused unless stored uncompressed and inside the file."""
    records = archive.infolist()
    if not records or "/" not in records[0].filename:
        raise CheckpointError(f"{path} {_UNREADABLE}: a zip archive but not a torch.save one")
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path} holds a compressed record {record.filename!r} ({record.compress_size:,} "
                f"bytes declared to expand to {record.file_size:,}); torch.save never compresses, "
                f"so it was refused without expanding it"
            )
        if record.file_size != record.compress_size or record.flag_bits & 0x1:
            raise CheckpointError(f"{path} {_UNREADABLE}: record {record.filename!r} is damaged")
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


def _check_legacy_checkpoint(path: Path, size: int) -> None:
    """Refuse a legacy (pre-zip) ``torch.save`` file whose storages declare more than it holds."""
    scan = _PickleScan(path, legacy=True)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        if scan.replay(view) != _LEGACY_MAGIC or scan.replay(view) != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path} {_UNREADABLE}")
        scan.replay(view)  # system information
        scan.replay(view)  # the saved object
        keys = scan.replay(view)
        left = size - view.tell()
    if not isinstance(keys, list):
        raise CheckpointError(f"{path} {_UNREADABLE}: no list of storages")
    needed = sum(_LEGACY_STORAGE_HEADER + storage.nbytes for storage in scan.storages.values())
    if needed > left:
        raise CheckpointError(
            f"{path} declares {needed:,} bytes of tensor data but holds {left:,} after its "
            f"pickle; it is truncated or forged, and was refused before allocating anything"
        )


class _Global:
    """A name the pickle imports, never resolved to the object it names."""

    def __init__(self, name: str) -> None:
        self.name = name


class _StorageType:
    def __init__(self, itemsize: int) -> None:
        self.itemsize = itemsize


class _Storage:
    def __init__(self, nbytes: int, itemsize: int) -> None:
        self.nbytes, self.itemsize = nbytes, itemsize


class _Tensor:
    """A dense tensor the pickle builds; ``problem`` says why it is refused, if it is."""

    def __init__(self, problem: str | None = None) -> None:
        self.problem = problem


_REBUILD_TENSOR = {
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
}
_GLOBALS = _REBUILD_TENSOR | {  # the names, besides dtypes and storage types, a pickle may import
    "torch._tensor._rebuild_from_type_v2",
    "torch.nn.parameter.Parameter",
    "torch.Tensor",
    "torch.Size",
    "torch.device",
    "torch.serialization._get_layout",
    "collections.OrderedDict",
    "collections.Counter",
    "builtins.set",
    "builtins.complex",
    "builtins.bytearray",
    "_codecs.encode",
}
_DTYPES = {f"torch.{name}": v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
_STORAGE_ITEMSIZE = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
    "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8,
}  # fmt: skip
_STORAGE_TYPES = {
    "torch.UntypedStorage": 1,
    "torch.storage.UntypedStorage": 1,
    **{f"{module}.{kind}Storage": itemsize
       for kind, itemsize in _STORAGE_ITEMSIZE.items() for module in ("torch", "torch.cuda")},
}  # fmt: skip
_EMPTY = {pickle.EMPTY_TUPLE: tuple, pickle.EMPTY_LIST: list, pickle.EMPTY_DICT: dict,
          pickle.EMPTY_SET: set}  # fmt: skip
_CONSTANTS = {pickle.NONE: None, pickle.NEWTRUE: True, pickle.NEWFALSE: False}
_NUMBERS = {pickle.BININT: "<i", pickle.BININT1: "<B", pickle.BININT2: "<H",
            pickle.BINFLOAT: ">d"}  # fmt: skip
_MEMO_INDEX = {pickle.BINGET: "<B", pickle.LONG_BINGET: "<I", pickle.BINPUT: "<B",
               pickle.LONG_BINPUT: "<I"}  # fmt: skip
_TUPLES = {pickle.TUPLE1: 1, pickle.TUPLE2: 2, pickle.TUPLE3: 3}


class _Malformed(Exception):
    """A pickle that torch's weights-only unpickler would not read either."""


class _PickleScan:
    """Replays pickles of the opcode subset torch's weights-only unpickler reads, on placeholders.

    Nothing is imported, called or allocated: globals stay names, storages are declared sizes
    and tensors are checked against them. ``storages`` collects each storage the pickles
    allocates (by key: later declarations of a key share the first) with its size in bytes.
    """

    def __init__(self, path: Path, *, legacy: bool) -> None:
        self.path, self.legacy = path, legacy
        self.storages: dict[str, _Storage] = {}
        self.loaded: dict[object, _Storage] = {}
        self.refused: list[_Tensor] = []

    def replay(self, file: IO[bytes] | mmap.mmap) -> object:
        """The value of the next pickle in ``file``, with placeholders for tensors and globals.

        Raises:
            CheckpointError: the pickle is malformed or holds what a state dict never holds.
        """
        try:
            result = self._replay(file)
        except CheckpointError:
            raise
        except Exception as error:  # any failure of a malformed pickle
            raise _failure(self.path, _UNREADABLE, error) from None
        if self.refused:
            raise CheckpointError(f"{self.path} {self.refused[0].problem}; refused")
        return result

    def _replay(self, file: IO[bytes] | mmap.mmap) -> object:
        stack: list = []
        marks: list[list] = []
        memo: dict[int, object] = {}

        def read(count: int) -> bytes:
            data = file.read(count)
            if len(data) != count:
                raise _Malformed("truncated")
            return data

        while True:
            op = read(1)
            if op in _CONSTANTS:
                stack.append(_CONSTANTS[op])
            elif op in _EMPTY:
                stack.append(_EMPTY[op]())
            elif op in _NUMBERS:
                (number,) = struct.unpack(_NUMBERS[op], read(struct.calcsize(_NUMBERS[op])))
                stack.append(number)
            elif op == pickle.LONG1:
                stack.append(int.from_bytes(read(read(1)[0]), "little", signed=True))
            elif op == pickle.BINUNICODE:
                (length,) = struct.unpack("<I", read(4))
                stack.append(str(read(length), "utf-8", "surrogatepass"))
            elif op == pickle.SHORT_BINSTRING:
                stack.append(read(read(1)[0]).decode("utf-8"))
            elif op in _MEMO_INDEX:
                (index,) = struct.unpack(_MEMO_INDEX[op], read(struct.calcsize(_MEMO_INDEX[op])))
                if op in (pickle.BINGET, pickle.LONG_BINGET):
                    if index not in memo:
                        raise _Malformed(f"memo entry {index} read before it is written")
                    stack.append(memo[index])
                else:
                    memo[index] = stack[-1]
            elif op == pickle.MARK:
                marks.append(stack)
                stack = []
            elif op == pickle.TUPLE:
                items, stack = stack, marks.pop()
                stack.append(tuple(items))
            elif op in _TUPLES:
                count = _TUPLES[op]
                if len(stack) < count:
                    raise _Malformed("stack underflow")
                stack[-count:] = [tuple(stack[-count:])]
            elif op in (pickle.APPEND, pickle.APPENDS):
                if op == pickle.APPEND:
                    items = [stack.pop()]
                else:
                    items, stack = stack, marks.pop()
                if type(stack[-1]) is not list:
                    raise _Malformed("append to a non-list")
                stack[-1].extend(items)
            elif op in (pickle.SETITEM, pickle.SETITEMS):
                if op == pickle.SETITEM:
                    value = stack.pop()
                    items = [stack.pop(), value]
                else:
                    items, stack = stack, marks.pop()
                self._set_items(stack[-1], items)
            elif op == pickle.GLOBAL:
                stack.append(self._global(file.readline(), file.readline()))
            elif op == pickle.REDUCE:
                arguments = stack.pop()
                stack[-1] = self._call(stack[-1], arguments)
            elif op == pickle.NEWOBJ:
                arguments = stack.pop()
                stack.append(self._new(stack.pop(), arguments))
            elif op == pickle.BUILD:
                stack.pop()
                if type(stack[-1]) is not OrderedDict:  # torch sets tensors' storage here
                    raise _Malformed(f"BUILD on {type(stack[-1]).__name__}")
            elif op == pickle.BINPERSID:
                stack.append(self._storage(stack.pop()))
            elif op == pickle.PROTO:
                if read(1)[0] > pickle.HIGHEST_PROTOCOL:
                    raise _Malformed("an unknown pickle protocol")
            elif op == pickle.STOP:
                return stack.pop()
            else:
                raise _Malformed(f"unsupported opcode {op!r}")

    def _global(self, module_line: bytes, name_line: bytes) -> object:
        if not module_line.endswith(b"\n") or not name_line.endswith(b"\n"):
            raise _Malformed("truncated GLOBAL")
        module, name = module_line[:-1].decode("utf-8"), name_line[:-1].decode("utf-8")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _GLOBALS:
            return _Global(full)
        if full in _DTYPES:
            return _DTYPES[full]
        if full in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[full])
        raise CheckpointError(
            f"{self.path} holds pickled Python objects beyond dense tensors and plain "
            f"containers, so it was refused without executing anything (GLOBAL {full}). "
            f"Re-save only the weights, e.g. torch.save(model.state_dict(), path)."
        )

    def _set_items(self, target: object, items: list) -> None:
        if type(target) not in (dict, OrderedDict, Counter) or len(items) % 2:
            raise _Malformed("SETITEMS on a non-dict")
        for key, value in zip(items[::2], items[1::2]):
            if isinstance(value, _Tensor) and value.problem is not None:
                raise CheckpointError(f"{self.path}: tensor {key!r} {value.problem}; refused")
            target[key] = value

    def _storage(self, pid: object) -> _Storage:
        if type(pid) is not tuple or len(pid) != (6 if self.legacy else 5) or pid[0] != "storage":
            raise _Malformed("a persistent id that is not a storage")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or type(numel) is not int or numel < 0:
            raise _Malformed("a storage of unknown type or size")
        if not isinstance(key, str):
            raise _Malformed("a storage key that is not a string")
        itemsize = storage_type.itemsize
        if key not in self.loaded:  # as torch.load, the first declaration of a key counts
            self.loaded[key] = self.storages[key] = _Storage(numel * itemsize, itemsize)
        storage = self.loaded[key]
        if not self.legacy or pid[5] is None:
            return storage
        view_key, offset, count = pid[5]
        if type(offset) is not int or type(count) is not int or offset < 0 or count < 0:
            raise _Malformed("a storage view of unknown extent")
        if view_key not in self.loaded:
            end = min(storage.nbytes, (offset + count) * itemsize)
            self.loaded[view_key] = _Storage(max(0, end - offset * itemsize), itemsize)
        return self.loaded[view_key]

    def _new(self, cls: object, arguments: object) -> object:
        if not isinstance(cls, _Global) or cls.name not in (
            "torch.nn.parameter.Parameter",
            "collections.OrderedDict",
            "collections.Counter",
            "builtins.set",
        ):
            raise _Malformed("NEWOBJ of a class a state dict never holds")
        if cls.name == "torch.nn.parameter.Parameter":
            return self._call(cls, arguments)
        return {"collections.OrderedDict": OrderedDict, "collections.Counter": Counter,
                "builtins.set": set}[cls.name]()  # fmt: skip

    def _call(self, function: object, arguments: object) -> object:
        if not isinstance(function, _Global) or type(arguments) not in (tuple, list):
            raise _Malformed("a call of something that is not an allowed function")
        name, arguments = function.name, tuple(arguments)
        if name in _REBUILD_TENSOR:
            return self._rebuild(name, arguments)
        if name == "torch._tensor._rebuild_from_type_v2":
            rebuild, new_type, inner, _state = arguments
            if not isinstance(new_type, _Global) or new_type.name not in (
                "torch.Tensor",
                "torch.nn.parameter.Parameter",
            ):
                raise _Malformed("a tensor subclass")
            if not isinstance(rebuild, _Global) or rebuild.name not in _REBUILD_TENSOR:
                raise _Malformed("a tensor rebuilt by an unknown function")
            return self._call(rebuild, inner)
        if name == "torch.nn.parameter.Parameter":
            if arguments and not isinstance(arguments[0], _Tensor):
                raise _Malformed("a parameter of something that is not a tensor")
            return arguments[0] if arguments else _Tensor()
        if name == "torch.Size":
            (dims,) = arguments
            return _shape(dims)
        if name == "_codecs.encode":
            text, encoding = arguments
            if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
                raise _Malformed("an encoding other than the one pickle uses for bytes")
            return text.encode("latin1")
        if name == "builtins.bytearray":
            if arguments and not isinstance(arguments[0], (bytes, str)):
                raise _Malformed("a bytearray built from a size")
            return bytearray(*arguments)
        if name in ("torch.device", "torch.serialization._get_layout"):
            return _Global(name)  # a value that cannot be called again
        containers: dict[str, Callable] = {
            "collections.OrderedDict": OrderedDict,
            "collections.Counter": Counter,
            "builtins.set": set,
            "builtins.complex": complex,
        }
        if name not in containers:
            raise _Malformed(f"a call of {name}")
        return containers[name](*arguments)

    def _rebuild(self, name: str, arguments: tuple) -> _Tensor:
        if name in (
            "torch._utils._rebuild_parameter",
            "torch._utils._rebuild_parameter_with_state",
        ):
            if not arguments or not isinstance(arguments[0], _Tensor):
                raise _Malformed("a parameter of something that is not a tensor")
            return arguments[0]
        storage, offset, size, stride = arguments[:4]
        if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
            raise _Malformed("a tensor without a storage")
        itemsize = storage.itemsize
        if name == "torch._utils._rebuild_tensor_v3":
            if not isinstance(arguments[6], torch.dtype):
                raise _Malformed("a tensor of unknown dtype")
            itemsize = arguments[6].itemsize
        size, stride = _shape(size), _shape(stride)
        if len(size) != len(stride):
            raise _Malformed("a tensor whose size and stride differ in length")
        numel = math.prod(size)
        tensor = _Tensor()
        if numel * itemsize > storage.nbytes:
            tensor.problem = (
                f"declares shape {tuple(size)} ({numel:,} elements, {numel * itemsize:,} bytes "
                f"once copied) on a storage of {storage.nbytes:,} bytes: a zero-stride or "
                f"expanded tensor"
            )
            self.refused.append(tensor)
        return tensor


def _shape(dims: object) -> tuple[int, ...]:
    if type(dims) not in (tuple, list) or any(type(d) is not int or d < 0 for d in dims):
        raise _Malformed("a size or stride that is not a list of non-negative ints")
    return tuple(dims)


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
    _check_keys(tensors, str(path))
    return tensors


def _check_keys(state_dict: Mapping[object, object], source: str) -> None:
    key = next((key for key in state_dict if not isinstance(key, str)), None)
    if key is not None:
        raise CheckpointError(
            f"{source} has a key {key!r} of type {type(key).__name__}; the keys of a state dict "
            f"are parameter names (strings)"
        )


def strip_prefix(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Drop the module prefix (``model.``, ``module.``, ...) that best matches ``model``'s keys.

    The prefix is the one under which most keys name a key of ``model`` (or a stage marker);
    the shortest wins a tie. Only a key's last parts are tried, as many as the longest name
    has: time grows linearly with the number of keys.

    Raises:
        CheckpointError: a key is not a string.
    """
    _check_keys(state_dict, "the state dict")
    expected = set(model.state_dict()) | {
        k for k in state_dict if k.rsplit(".", 1)[-1].startswith(MARKER)
    }
    tails = {k.rsplit(".", 1)[-1] for k in expected}
    depth = max((k.count(".") for k in expected), default=0) + 1  # most parts of a name
    matches: Counter[str] = Counter()
    for key in state_dict:
        pieces = key.rsplit(".", depth)
        if pieces[-1] not in tails:
            continue
        for start in range(len(pieces)):  # the key without 0, 1, ... leading parts
            rest = ".".join(pieces[start:])
            if rest in expected:
                matches[key[: len(key) - len(rest)]] += 1
    best = min(matches, key=lambda prefix: (-matches[prefix], len(prefix), prefix), default="")
    if not best:
        return dict(state_dict)
    return {k[len(best) :]: v for k, v in state_dict.items() if k.startswith(best)}


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``, adopting the ODE form its markers record.

    Stages whose marker is present are converted to ODE form with the stored horizon before
    loading; stages without one are returned to the plain form. A prefix such as ``model.``
    (Lightning) or ``module.`` (DDP) is stripped.

    Raises:
        CheckpointError: the keys do not match the model (the message lists missing and
            unexpected keys), or a marker is not a finite positive scalar horizon the stage
            can use (the message names the marker's key).
    """
    state_dict = strip_prefix(state_dict, model)
    try:
        stages = find_stages(model)
    except ValueError:
        stages = []
    prefix_of = {id(module): f"{name}." if name else "" for name, module in model.named_modules()}
    keys = [prefix_of[id(stage.container)] + stage.marker for stage in stages]
    horizons = [
        _marker_horizon(key, state_dict[key], stage) if key in state_dict else None
        for stage, key in zip(stages, keys)
    ]
    for stage, horizon in zip(stages, horizons):
        if horizon is None:
            unconvert_stage(stage)
            continue
        if stage.is_ode_form and stage.horizon != horizon:
            unconvert_stage(stage)
        convert_stage(stage, horizon)
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
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: {_reason(error)}"
        ) from None
    return model


def _marker_horizon(key: str, value: object, stage: Stage) -> float:
    """The horizon a stage marker records, refused unless ``stage`` can run with it."""
    if (
        not isinstance(value, Tensor)
        or value.dim() != 0
        or value.is_complex()
        or value.dtype == torch.bool
    ):
        found = (
            f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise CheckpointError(
            f"marker {key!r} must be a scalar holding the stage's ODE horizon (a finite "
            f"positive number); found {found}"
        )
    horizon = float(value)
    if not (math.isfinite(horizon) and horizon > 0):
        raise CheckpointError(
            f"marker {key!r} holds {horizon!r}; an ODE horizon is a finite positive number"
        )
    try:
        check_step(horizon, stage)
    except ValueError as error:
        raise CheckpointError(f"marker {key!r}: {error}") from None
    return horizon


def _head(keys: list[str], count: int = 8) -> str:
    shown = ", ".join(keys[:count])
    return f"[{shown}{', ...' if len(keys) > count else ''}]"


_TEMPORARY_SUFFIX = ".resode-partial"
_FILE_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link that does not resolve",
}


def writable_target(path: str | os.PathLike) -> Path:
    """The regular file that writing ``path`` creates or replaces, checked before any work.

    A symbolic link is written through: the file it points to is replaced, the link is kept.

    Raises:
        FileNotFoundError: the directory does not exist.
        IsADirectoryError: ``path`` is a directory.
        PermissionError: the directory is not writable.
        ValueError: ``path`` exists and is not a regular file (a device, a FIFO, a socket).
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    shown = repr(str(path)) + (f" (a link to {str(target)!r})" if target != path else "")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {shown}: directory {str(target.parent)!r} does not exist"
        )
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise IsADirectoryError(f"cannot write {shown}: it is a directory")
    if mode is not None and not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ValueError(
            f"cannot write {shown}: it is {kind}, which would be replaced; give a file path"
        )
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write {shown}: directory {str(target.parent)!r} is not writable"
        )
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(fileobj)`` so that it appears whole or not at all.

    The content goes to a temporary file beside the target, ``.NAME.<random>.resode-partial``,
    that replaces the target only once it is complete; on any error it is removed and an
    existing file is left untouched. Such files left by a killed write are removed by the next
    write to the same path (on POSIX systems, where a live writer's file is locked). Writers
    running at once each write their own file; the last to finish replaces the target. Paths
    are checked as by :func:`writable_target`; a symbolic link is written through.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, ValueError: see
            :func:`writable_target`; PermissionError too when the directory refuses a new file.
        OSError: the device is full (``errno.ENOSPC``, also when ``torch.save`` reports it as
            a ``RuntimeError``); the message says so and names the path.
    """
    target = writable_target(path)
    _remove_leftovers(target)
    handle, temporary = _create_locked(target, path)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
            os.chmod(temporary, _mode_for(target))
            os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if _out_of_space(error):
            raise _no_space(path, target) from error
        raise
    return Path(path)


def _create_locked(target: Path, path: str | os.PathLike) -> tuple[int, Path]:
    """A new temporary file for ``target``: its descriptor, locked where locks exist, and name.

    Another writer's cleanup (:func:`_remove_leftovers`) may delete the file between its
    creation and its lock; then another is created. That takes a cleanup per retry, so it ends.
    """
    while True:
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}{_TEMPORARY_SUFFIX}")
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise type(error)(
                f"cannot write {str(path)!r}: creating a file in {str(target.parent)!r} failed "
                f"({error.strerror})"
            ) from error
        if _locked_in_place(handle, temporary):
            return handle, temporary
        os.close(handle)


def _locked_in_place(handle: int, temporary: Path) -> bool:
    """Lock the open file ``handle``; ``False`` if ``temporary`` no longer names it (a cleanup
    deleted it before the lock). ``True`` without a lock where there are none: such files are
    never cleaned up."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while a cleanup that took it first deletes it
    except OSError:  # a file system without locks
        return True
    try:
        return os.path.samestat(os.fstat(handle), os.stat(temporary))
    except FileNotFoundError:
        return False


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from or while handling, is ``ENOSPC``
    (``torch.save`` turns a failed write into a ``RuntimeError`` raised while handling it)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _no_space(path: str | os.PathLike, target: Path) -> OSError:
    """The ``ENOSPC`` error of a write to ``path`` that did not fit on its device."""
    kept = "the existing file is kept" if target.exists() else "no file was written"
    error = OSError(
        f"cannot write {str(path)!r}: no space left on the device holding "
        f"{str(target.parent)!r}; {kept}; free some space and retry"
    )
    error.errno = errno.ENOSPC
    return error


def _remove_leftovers(target: Path) -> None:
    """Delete the temporary files of killed writes to ``target``: those no writer has locked."""
    if fcntl is None:
        return
    pattern = re.compile(
        rf"\.{re.escape(target.name)}\.[0-9a-f]{{16}}{re.escape(_TEMPORARY_SUFFIX)}"
    )
    try:
        with os.scandir(target.parent) as entries:
            leftovers = [
                e.path
                for e in entries
                if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)
            ]
    except OSError:  # a directory that can be written but not listed
        return
    for leftover in leftovers:
        try:
            handle = os.open(leftover, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(leftover)
        except OSError:  # locked by a live writer, or already gone
            pass
        finally:
            os.close(handle)


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
