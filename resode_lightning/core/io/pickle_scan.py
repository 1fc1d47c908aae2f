"""Pickles of ``torch.save`` files replayed on placeholders, so that their sizes are checked
before ``torch.load`` allocates anything.

Only the opcodes and names torch's weights-only unpickler reads are accepted. Nothing is
imported, called or allocated: globals stay names, storages are declared sizes, tensors are
checked against the storage they view.
"""

from __future__ import annotations

import _compat_pickle
import math
import mmap
import pickle
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from resode_lightning.core.io.errors import UNREADABLE, CheckpointError, failure


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


class PickleScan:
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
            raise failure(self.path, UNREADABLE, error) from None
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
