"""The safe reader of pickles of numpy arrays (CIFAR-10 batches, for one).

A restricted unpickler builds only plain containers, strings, numbers and numpy arrays, so a
tampered file cannot run code, and every array's declared size is checked against the file's
size before it is allocated.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array rebuild function


class ArrayPickleError(ValueError):
    """A pickle :func:`read_array_pickle` refuses; the message names the file and why."""


def read_array_pickle(path: str | os.PathLike, *, what: str, advice: str = "") -> object:
    """The object the pickle file ``path`` holds: plain containers, strings, numbers and numpy
    arrays, read without executing any code, each array's declared size checked against the
    file's size before it is allocated.

    Args:
        path: the file.
        what: what the file should be, for messages (``"CIFAR-10 batch"``).
        advice: what to do about a file that cannot be used, appended to messages.

    Raises:
        ArrayPickleError: the file cannot be read, is not a readable pickle (corrupt,
            truncated, other objects, arrays larger than the file), or does not fit in memory.
    """
    path = Path(path)
    advice = f"; {advice}" if advice else ""
    try:
        data = path.read_bytes()
        return _ArraysOnly(io.BytesIO(data), path, len(data)).load()
    except OSError as error:
        raise ArrayPickleError(f"{path} cannot be read ({error.strerror}){advice}") from None
    except MemoryError:
        raise ArrayPickleError(f"{path} does not fit in memory; free memory and retry") from None
    except ArrayPickleError as error:
        raise ArrayPickleError(f"{error}{advice}") from None
    except Exception as error:  # pickle and numpy raise many types on damaged files
        raise ArrayPickleError(f"{path} is not a readable {what} ({error}){advice}") from None


class _ArraysOnly(pickle._Unpickler):  # the Python unpickler: its BUILD can be checked
    """Unpickler that resolves only numpy array reconstruction (and byte-string encoding).

    Every array is checked before it is allocated: the bytes its shape and dtype declare must
    fit in the file (``limit`` bytes), and the data it is filled with must be exactly what
    they declare (numpy leaves object arrays filled from a short list with dangling pointers).
    """

    def __init__(self, file: io.BytesIO, path: Path, limit: int) -> None:
        super().__init__(file, encoding="bytes")
        self.path, self.limit = path, limit
        self._ndarray = self._new_array  # one bound method: the class _reconstruct is given

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy", "ndarray"): self._ndarray,
            ("numpy", "dtype"): np.dtype,
            # Python 3 pickles of bytes at protocol 2 call codecs.encode(str, "latin1").
            ("_codecs", "encode"): _latin1,
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy arrays, plain containers, strings "
                f"and numbers are read"
            ) from None

    def _reconstruct(self, subtype: object, shape: object, dtype: object) -> np.ndarray:
        """numpy's ``_reconstruct`` of a plain array, once its declared size is checked."""
        if subtype is not self._ndarray:
            raise pickle.UnpicklingError("an array of a type other than numpy.ndarray")
        self._check_size(shape, np.dtype(dtype))
        return _RECONSTRUCT(np.ndarray, shape, dtype)

    def _new_array(self, shape: object, dtype: object = float, *rest: object) -> np.ndarray:
        """``numpy.ndarray(shape, dtype, ...)``, once its declared size is checked."""
        self._check_size(shape, np.dtype(dtype))
        return np.ndarray(shape, dtype, *rest)

    def _check_size(self, shape: object, dtype: np.dtype) -> int:
        """The element count of ``shape``, refused beyond ``limit`` bytes."""
        count = _count(shape)
        if count * dtype.itemsize > self.limit:
            raise ArrayPickleError(
                f"{self.path} declares a {dtype} array of shape {shape} ({count * dtype.itemsize:,}"
                f" bytes) in a {self.limit:,}-byte file; it is damaged or forged and was refused "
                f"before allocating anything"
            )
        return count

    def load_build(self) -> None:
        """BUILD, for arrays and dtypes only; an array's state must hold the data it declares."""
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.ndarray):
            self._check_array_state(state)
        elif not isinstance(target, np.dtype):
            raise pickle.UnpicklingError(f"setting the state of a {type(target).__name__}")
        super().load_build()

    def _check_array_state(self, state: object) -> None:
        """Refuse an ``ndarray.__setstate__`` argument whose data is not what it declares."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("an array state numpy never writes")
        shape, dtype, _, data = state[-4:]
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError("an array state without a dtype")
        # an object array's items are in memory already, as a list: only its length counts
        count = _count(shape) if dtype.hasobject else self._check_size(shape, dtype)
        given = len(data) if isinstance(data, (bytes, list)) else None
        expected = count if dtype.hasobject else count * dtype.itemsize
        if given != expected or isinstance(data, list) != dtype.hasobject:
            raise pickle.UnpicklingError(
                f"an array of shape {shape} and dtype {dtype} holding {given} items or bytes, "
                f"not {expected}"
            )

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def _count(shape: object) -> int:
    """The element count of an array ``shape`` (an int or a tuple of ints) a pickle declares."""
    dims = shape if isinstance(shape, tuple) else (shape,)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"an array of shape {shape!r}")
    return math.prod(dims)


def _latin1(text: object, encoding: str) -> bytes:
    """``codecs.encode(text, encoding)`` for the one use pickles make of it (str to bytes)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codecs.encode of {type(text).__name__} to {encoding!r}")
    return codecs.encode(text, encoding)
