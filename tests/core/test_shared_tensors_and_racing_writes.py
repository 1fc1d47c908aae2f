"""Hardening, round three (issue 21), checkpoints and writes: tensors sharing memory, forged
safetensors headers, a full disk, writers racing on one path, out-of-memory reads, and the
arguments of ``resode bench``."""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import one_line_error

from resode_lightning import CheckpointError, load_state_dict_file
from resode_lightning.cli import bench, main
from resode_lightning.core.io import atomic, checkpoint
from resode_lightning.core.io.atomic import atomic_save, atomic_write
from resode_lightning.core.io.checkpoint import safe_torch_load


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".resode-partial"))


# ----------------------------------------------------------------------------- shared storage


@pytest.mark.parametrize(
    "alias",
    [
        lambda flat: flat[:16].view(4, 4),
        lambda flat: flat[:16],
        lambda flat: flat[:16].view(4, 4).t(),
        lambda flat: flat[2:18].view(4, 4),
    ],
    ids=["same-bytes", "other-shape", "transpose", "overlapping-slice"],
)
@pytest.mark.parametrize("lightning", [False, True], ids=["pth", "lightning-ckpt"])
def test_tensors_sharing_memory_are_refused_naming_both(tmp_path, alias, lightning):
    """An optimizer step on one of two aliased parameters changed the other."""
    flat = torch.randn(20)
    state = {
        "a.weight": torch.randn(4, 4),
        "b.weight": flat[:16].view(4, 4),
        "c.weight": alias(flat),
    }
    content = {"state_dict": state, "epoch": 3} if lightning else state
    path = tmp_path / ("model.ckpt" if lightning else "model.pth")
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="share memory") as caught:
        load_state_dict_file(path)
    message = str(caught.value)
    assert str(path) in message and "b.weight" in message and "c.weight" in message
    assert "a.weight" not in message
    with pytest.raises(CheckpointError, match="share memory"):
        safe_torch_load(path)  # the reader of saved neural ODEs too


def test_disjoint_views_of_one_storage_load_as_separate_tensors(tmp_path):
    flat = torch.arange(12.0)
    torch.save({"a": flat[:6].view(2, 3), "b": flat[6:], "empty": flat[:0]}, tmp_path / "m.pt")
    loaded = load_state_dict_file(tmp_path / "m.pt")
    loaded["a"].add_(100)
    assert loaded["b"].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]


# ----------------------------------------------------------------------------- safetensors


def safetensors_bytes(header: str, data: bytes) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the JSON header, the data."""
    encoded = header.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def entry(name: str, dtype: str, shape: list[int], start: int, stop: int) -> str:
    return (
        f'"{name}": {json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [start, stop]})}'
    )


def test_safetensors_with_a_repeated_key_is_refused(tmp_path):
    """safetensors kept the last of two entries named alike: a weight replaced silently."""
    data = struct.pack("<4f", 1, 2, 3, 4)
    header = (
        "{" + entry("fc.weight", "F32", [2], 0, 8) + ", " + entry("fc.weight", "F32", [2], 8, 16)
    )
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header + "}", data))
    with pytest.raises(CheckpointError, match="repeats the key 'fc.weight'") as caught:
        load_state_dict_file(path)
    assert str(path) in str(caught.value)
    nested = '{"__metadata__": {"format": "pt", "format": "np"}, ' + entry("w", "F32", [4], 0, 16)
    path.write_bytes(safetensors_bytes(nested + "}", data))
    with pytest.raises(CheckpointError, match="repeats the key 'format'"):
        load_state_dict_file(path)


@pytest.mark.parametrize("dtype", ["I64", "I32", "U8", "BOOL", "C64"])
def test_safetensors_weights_that_are_not_floats_are_refused(tmp_path, dtype):
    itemsize = {"I64": 8, "I32": 4, "U8": 1, "BOOL": 1, "C64": 8}[dtype]
    header = "{" + entry("fc.weight", dtype, [2], 0, 2 * itemsize) + "}"
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(2 * itemsize)))
    with pytest.raises(CheckpointError, match=f"'fc.weight' has dtype '{dtype}'") as caught:
        load_state_dict_file(path)
    assert str(path) in str(caught.value) and "floating point" in str(caught.value)


def test_safetensors_of_float_weights_and_integer_buffers_load(tmp_path):
    header = (
        '{"__metadata__": {"format": "pt"}, '
        + entry("bn.weight", "F32", [2], 0, 8)
        + ", "
        + entry("bn.num_batches_tracked", "I64", [], 8, 16)
        + ", "
        + entry("fc.weight", "BF16", [2], 16, 20)
        + "}"
    )
    data = struct.pack("<2f", 1.5, 2.5) + struct.pack("<q", 7) + bytes(4)
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    loaded = load_state_dict_file(path)
    assert loaded["bn.weight"].tolist() == [1.5, 2.5]
    assert int(loaded["bn.num_batches_tracked"]) == 7
    assert loaded["fc.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x05\x00", "too short"),
        (struct.pack("<Q", 2**40) + b"{}", "declares a 1,099,511,627,776-byte header in a 10-byte"),
        (safetensors_bytes('{"w": [', b""), "header is not JSON"),
        (safetensors_bytes("[1, 2]", b""), "header is not a JSON object"),
    ],
    ids=["short", "header-beyond-file", "bad-json", "not-object"],
)
def test_damaged_safetensors_headers_give_a_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_state_dict_file(path)
    assert str(path) in str(caught.value)


# ----------------------------------------------------------------------------- full disk


class _FullDisk(io.FileIO):
    """A file on a device that fills up after ``room`` bytes."""

    room = 600

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def _assert_no_space(error: OSError, path: Path) -> None:
    assert error.errno == errno.ENOSPC
    assert "no space left on the device" in str(error) and str(path) in str(error)
    assert "[enforce fail" not in str(error)


def test_full_disk_in_torch_save_is_named_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save reported ENOSPC as RuntimeError: [enforce fail at inline_container.cc]."""
    target = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    full = lambda handle, mode: io.BufferedWriter(_FullDisk(handle, "w"))  # noqa: E731
    monkeypatch.setattr(atomic.os, "fdopen", full)
    with pytest.raises(OSError) as caught:
        atomic_save({"w": torch.zeros(10_000)}, target)
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("unexpected pos" in text for text in chain)  # torch's form, as in the issue
    _assert_no_space(caught.value, target)
    assert "existing file is kept" in str(caught.value)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def _enospc(file) -> None:
    file.write(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")


def _enospc_as_torch_reports_it(file) -> None:
    try:
        _enospc(file)
    except OSError:  # torch raises its own error while handling the write's, not from it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0")  # noqa: B904


@pytest.mark.parametrize("write", [_enospc, _enospc_as_torch_reports_it])
def test_full_disk_in_a_write_is_named_and_leaves_nothing(tmp_path, write):
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "notes.txt", write)
    _assert_no_space(caught.value, tmp_path / "notes.txt")
    assert type(caught.value.__cause__) is (OSError if write is _enospc else RuntimeError)
    assert "no file was written" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_unchanged(tmp_path):
    def write(file) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "model.pt", write)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- concurrent writers

WRITERS, SAVES = 6, 150


def _save_repeatedly(path: str, writer: int) -> list[str]:
    """``SAVES`` saves to ``path`` of a tensor filled with one value; the errors, as text."""
    errors = []
    for index in range(SAVES):
        value = float(writer * SAVES + index)
        try:
            atomic_save({"w": torch.full((512,), value), "v": torch.tensor(value)}, path)
        except Exception as error:  # collected: every failure counts
            errors.append(f"{type(error).__name__}: {error}")
    return errors


@pytest.mark.skipif(sys.platform == "win32", reason="leftover cleanup needs POSIX locks")
def test_concurrent_writers_to_one_path_all_succeed_and_leave_a_whole_file(tmp_path):
    """Six writers, 900 saves: 11 failed with FileNotFoundError on their own partial file,
    deleted by another writer's cleanup before they had locked it."""
    path = tmp_path / "model.pt"
    context = multiprocessing.get_context("fork")
    with context.Pool(WRITERS) as pool:
        results = pool.starmap(_save_repeatedly, [(str(path), w) for w in range(WRITERS)])
    assert [error for errors in results for error in errors] == []
    loaded = load_state_dict_file(path)
    value = float(loaded["v"])
    assert torch.equal(loaded["w"], torch.full((512,), value))
    assert leftovers(tmp_path) == []


def test_a_partial_file_deleted_before_its_lock_is_replaced(tmp_path, monkeypatch):
    """The race itself, made certain: a cleanup deletes the first partial file before it is
    locked; the write goes on in a new one."""
    real_lock, deleted = atomic._locked_in_place, []

    def cleaned_first(handle: int, temporary: Path) -> bool:
        if not deleted:
            deleted.append(temporary.name)
            atomic._remove_leftovers(tmp_path / "model.pt")  # another writer's cleanup
        return real_lock(handle, temporary)

    monkeypatch.setattr(atomic, "_locked_in_place", cleaned_first)
    atomic_save({"w": torch.ones(3)}, tmp_path / "model.pt")
    assert deleted and load_state_dict_file(tmp_path / "model.pt")["w"].tolist() == [1.0] * 3
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- out of memory


def _no_memory(*args, **kwargs):
    raise MemoryError


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_out_of_memory_while_reading_is_a_checkpoint_error_naming_the_file(
    tmp_path, monkeypatch, suffix
):
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save({"w": torch.ones(2)}, path)
        monkeypatch.setattr(checkpoint.torch, "load", _no_memory)
    else:
        path.write_bytes(safetensors_bytes("{" + entry("w", "F32", [2], 0, 8) + "}", bytes(8)))
        monkeypatch.setattr("safetensors.torch.load_file", _no_memory)
    with pytest.raises(CheckpointError, match="out of memory") as caught:
        load_state_dict_file(path)
    assert str(path) in str(caught.value)


def test_out_of_memory_in_the_size_checks_is_named_too(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(checkpoint, "_check_zip_checkpoint", _no_memory)
    with pytest.raises(CheckpointError, match=f"{path} could not be loaded: out of memory"):
        safe_torch_load(path)


# ----------------------------------------------------------------------------- resode bench


@pytest.fixture
def no_measurement(monkeypatch):
    """Fail the test if ``resode bench`` starts measuring."""

    def measured(*args, **kwargs):
        raise AssertionError("measured despite a bad argument")

    monkeypatch.setattr(bench, "memory_benchmark", measured)


@pytest.mark.parametrize(
    "arguments, named, valid",
    [
        (["--steps", "0"], "--steps", "from 1 to 4096"),
        (["--steps", "4", "-4"], "--steps", "from 1 to 4096"),
        (["--batch", "0"], "--batch", "from 1 to 4096"),
        (["--width", "0"], "--width", "from 1 to 1024"),
        (["--width", "100000"], "--width", "from 1 to 1024"),
        (["--size", "0"], "--size", "from 1 to 1024"),
        (["--depth", "0"], "--depth", "from 1 to 256"),
        (["--threads", "0"], "--threads", "from 1 to"),
        (["--repeats", "0"], "--repeats", "from 1 to 100"),
        (["--repeats", "two"], "--repeats", "'two' is not an integer"),
        (["--device", "foo"], "--device", "cpu, cuda or cuda:N"),
    ],
)
def test_bench_refuses_arguments_out_of_range_before_measuring(
    capsys, no_measurement, arguments, named, valid
):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *arguments])
    assert exit_.value.code == 2
    output = capsys.readouterr()
    one_line_error(output, "bench", f"argument {named}", valid)
    assert output.out == ""


def test_bench_refuses_a_device_it_does_not_have_and_a_huge_state(
    capsys, monkeypatch, no_measurement
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda:1"]) == 2
    output = capsys.readouterr()
    one_line_error(output, "bench", "--device cuda:1", "CUDA is not available")
    assert output.out == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["bench", "--device", "cuda:1"]) == 2
    one_line_error(capsys.readouterr(), "bench", "1 CUDA device(s), cuda:0 to cuda:0")
    arguments = ["bench", "--batch", "4096", "--width", "1024", "--size", "1024"]
    assert main(arguments) == 2
    one_line_error(capsys.readouterr(), "bench", "--batch 4096", "--width 1024", "1,073,741,824")


def test_bench_help_states_the_ranges(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("each 1 to 4096", "1 to 1024", "1 to 256", "1 to 100", "1 to the number of"):
        assert phrase in text


def test_containers_shared_many_times_are_walked_once(tmp_path):
    """12 levels of a list shared 10 times: 10**12 paths, one walk per container."""
    nested = [torch.zeros(1)]
    for _ in range(12):
        nested = [nested] * 10
    path = tmp_path / "shared.pt"
    torch.save({"a": nested}, path)
    started = time.perf_counter()
    safe_torch_load(path)
    assert time.perf_counter() - started < 10
