"""Atomic file writes: a file appears whole or not at all, and an existing one stays until then."""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so leftovers of killed writes stay
    fcntl = None

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
