"""Hostile checkpoint files: each unreadable one ends in a CheckpointError naming it, sizes are
checked before anything is allocated, and a seeded fuzz finds no other outcome."""

from __future__ import annotations

import io
import random
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from resode_lightning import CheckpointError, load_state_dict_file
from resode_lightning.core.odeform import strip_prefix


def tiny_state_dict() -> dict[str, torch.Tensor]:
    """A torchvision-like state dict (stem, one block, head) of a few hundred numbers."""
    generator = torch.Generator().manual_seed(0)
    state = {"conv1.weight": torch.randn(4, 3, 3, 3, generator=generator)}
    for norm in ("bn1", "layer1.0.bn1"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{norm}.{name}"] = torch.rand(4, generator=generator)
        state[f"{norm}.num_batches_tracked"] = torch.tensor(3)
    state["layer1.0.conv1.weight"] = torch.randn(4, 4, 3, 3, generator=generator)
    state["fc.weight"] = torch.randn(10, 4, generator=generator)
    state["fc.bias"] = torch.randn(10, generator=generator)
    return state


def saved(obj: object, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def rezip(data: bytes, edit=lambda name, content: content, deflate: str = "") -> bytes:
    """The zip checkpoint ``data`` with its records edited (CRCs kept right)."""
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for record in source.infolist():
            content = edit(record.filename, source.read(record.filename))
            kind = zipfile.ZIP_DEFLATED if record.filename.endswith(deflate or "\0") else 0
            target.writestr(record.filename, content, compress_type=kind)
    return out.getvalue()


def insert_into_dict(pickled: bytes, key: str, value_ops: bytes) -> bytes:
    """``data.pkl`` of a saved dict with an entry ``key`` for the value ``value_ops`` builds."""
    assert pickled.endswith(b".")  # STOP, with the dict on top of the stack
    encoded = key.encode()
    return pickled[:-1] + b"X" + struct.pack("<I", len(encoded)) + encoded + value_ops + b"s."


def refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as caught:
        load_state_dict_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert "weights_only" not in message
    return message


@pytest.mark.parametrize(
    "content",
    [
        b"hello, this is a text file\n",  # was KeyError: 101 (BINGET of 'e')
        b"GIF89a",  # was struct.error
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04;",
        bytes(random.Random(0).randbytes(4096)),
        b"\x80",  # was IndexError
        b"",
        b"PK\x03\x04" + bytes(64),
    ],
    ids=["text", "gif-header", "gif", "random", "one-byte", "empty", "zip-magic"],
)
def test_foreign_files_give_a_checkpoint_error_naming_the_file(tmp_path, content):
    (tmp_path / "file.pth").write_bytes(content)
    refused(tmp_path / "file.pth", "not a readable PyTorch checkpoint|is empty")


def test_damaged_legacy_files_give_a_checkpoint_error_naming_the_file(tmp_path):
    legacy = saved(tiny_state_dict(), legacy=True)
    assert legacy[15:21] == b"\x80\x02M\xe9\x03."  # the pickled protocol version, 1001
    damaged = {
        "memo": legacy[:15] + b"h" + legacy[16:],  # was KeyError: 2
        "cut-int": legacy[:19],  # was struct.error
        "cut-first": legacy[:1],  # was IndexError
    }
    for name, content in damaged.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
        refused(tmp_path / f"{name}.pt", "not a readable PyTorch checkpoint")
    (tmp_path / "ok.pt").write_bytes(legacy)
    assert load_state_dict_file(tmp_path / "ok.pt").keys() == tiny_state_dict().keys()


@pytest.mark.parametrize("key", [7, ("fc", "weight")], ids=["int", "tuple"])
def test_non_string_keys_are_refused_with_the_key_named(tmp_path, key):
    torch.save({"fc.bias": torch.zeros(2), key: torch.zeros(2, 2)}, tmp_path / "keys.pt")
    message = refused(tmp_path / "keys.pt", "parameter names")
    assert f"key {key!r} of type {type(key).__name__}" in message
    torch.save({"state_dict": {key: torch.zeros(1)}}, tmp_path / "nested.ckpt")
    refused(tmp_path / "nested.ckpt", "parameter names")
    with pytest.raises(CheckpointError, match="parameter names"):
        strip_prefix({key: torch.zeros(1)}, torch.nn.Linear(1, 1))


@pytest.mark.parametrize("classes", [500_000, 100_000_000])
def test_zero_stride_head_is_refused_before_allocation(tmp_path, classes):
    state = tiny_state_dict()
    state["fc.weight"] = torch.zeros(512).expand(classes, 512)
    torch.save(state, tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 64 * 1024
    message = refused(tmp_path / "bomb.pth", "zero-stride or expanded")
    assert "'fc.weight'" in message and f"({classes}, 512)" in message


def test_compressed_record_is_refused_without_expanding_it(tmp_path):
    numel = 16 * 2**20  # 64 MiB of zeros, deflated to about 64 KB

    def edit(name: str, content: bytes) -> bytes:
        if name.endswith("data.pkl"):
            declared = b"J" + struct.pack("<i", numel)
            return content.replace(b"K\x02t", declared + b"t").replace(
                b"K\x02\x85", declared + b"\x85"
            )
        return bytes(4 * numel) if name.endswith("data/0") else content

    forged = rezip(saved({"w": torch.zeros(2)}), edit, deflate="data/0")
    (tmp_path / "zipbomb.pt").write_bytes(forged)
    assert len(forged) < 1 << 20
    tracemalloc.start()
    try:
        message = refused(tmp_path / "zipbomb.pt", "compressed record")
        assert tracemalloc.get_traced_memory()[1] < 2 << 20
    finally:
        tracemalloc.stop()
    assert "67,108,864" in message


def test_storage_declared_larger_than_its_record_is_refused(tmp_path):
    declared = b"J" + struct.pack("<i", 2**28)

    def edit(name: str, content: bytes) -> bytes:
        return content.replace(b"K\x02t", declared + b"t") if name.endswith("data.pkl") else content

    (tmp_path / "forged.pt").write_bytes(rezip(saved({"w": torch.zeros(2)}), edit))
    message = refused(tmp_path / "forged.pt", "declares 1,073,741,824 bytes for tensor data")
    assert "holds 8 bytes" in message


def test_legacy_storage_declared_larger_than_the_file_is_refused(tmp_path):
    legacy = saved({"w": torch.zeros(4)}, legacy=True)
    assert legacy.count(b"K\x04N") == 1  # the storage's element count, then no view
    forged = legacy.replace(b"K\x04N", b"J" + struct.pack("<i", 2**31 - 1) + b"N")
    (tmp_path / "forged.pt").write_bytes(forged)
    refused(tmp_path / "forged.pt", "declares 8,589,934,5.. bytes of tensor data but holds")


@pytest.mark.parametrize(
    "value_ops",
    [
        b"c__builtin__\nbytearray\nJ" + struct.pack("<i", 2**28) + b"\x85R",
        b"ctorch\nFloatTensor\nJ" + struct.pack("<i", 2**28) + b"\x85R",
        b"c_codecs\nencode\n" * 25  # hex-encode b"a" 24 times: 16 MiB from 400 bytes
        + b"X\x01\x00\x00\x00aX\x06\x00\x00\x00latin1\x86R"
        + b"X\x03\x00\x00\x00hex\x86R" * 24,
    ],
    ids=["bytearray", "tensor-constructor", "codec"],
)
def test_pickled_calls_that_allocate_are_refused(tmp_path, value_ops):
    def edit(name: str, content: bytes) -> bytes:
        return (
            insert_into_dict(content, "extra", value_ops) if name.endswith("data.pkl") else content
        )

    (tmp_path / "calls.pt").write_bytes(rezip(saved({"w": torch.zeros(2)}), edit))
    tracemalloc.start()
    try:
        refused(tmp_path / "calls.pt", "refused|not a readable")
        assert tracemalloc.get_traced_memory()[1] < 2 << 20
    finally:
        tracemalloc.stop()


def test_valid_files_of_every_kind_still_load(tmp_path):
    state = tiny_state_dict()
    shared = torch.arange(6.0)
    files = {
        "zip.pt": {**state, "a": shared[:3], "b": shared[3:]},  # two views of one storage
        "legacy.pt": state,
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in state.items()},
                           "hyper_parameters": {"lr": 0.1, "betas": (0.9, 0.99)},
                           "optimizer_states": [{"state": {0: {"step": torch.tensor(1.0)}}}],
                           "dtype": torch.float16, "device": torch.device("cpu"),
                           "raw": b"\x00\xff", "tags": {"a", "b"}, "z": 1 + 2j},
        "parameters.pt": {"w": torch.nn.Parameter(torch.ones(3)),
                          "v": torch.ones(2, dtype=torch.float8_e4m3fn)},
    }  # fmt: skip
    for name, content in files.items():
        torch.save(content, tmp_path / name, _use_new_zipfile_serialization=name != "legacy.pt")
        loaded = load_state_dict_file(tmp_path / name)
        expected = content.get("state_dict", content)
        tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
        assert loaded.keys() == tensors.keys()
        for key, value in tensors.items():
            assert torch.equal(loaded[key].float(), value.float())


def _mutants(seed: int, count: int):
    """``count`` damaged copies of a small zip and legacy checkpoint, drawn with ``seed``."""
    rng = random.Random(seed)
    zipped, legacy = saved(tiny_state_dict()), saved(tiny_state_dict(), legacy=True)

    def flip(data: bytes, flips: int) -> bytes:
        damaged = bytearray(data)
        for _ in range(flips):
            at = rng.randrange(len(damaged))
            damaged[at] = (
                damaged[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
            )
        return bytes(damaged)

    kinds = [
        lambda: flip(legacy, rng.randint(1, 4)),
        lambda: flip(legacy[:400], rng.randint(1, 3)) + legacy[400:],  # the pickles
        lambda: flip(zipped, rng.randint(1, 4)),
        lambda: rezip(zipped, lambda n, c: flip(c, rng.randint(1, 3)) if n.endswith(".pkl") else c),
        lambda: (source := rng.choice([zipped, legacy]))[: rng.randrange(len(source))],
        lambda: rng.choice([b"", b"PK\x03\x04", b"\x80\x02", b"GIF89a"])
        + rng.randbytes(rng.randrange(2048)),
    ]  # fmt: skip
    for index in range(count):
        yield kinds[index % len(kinds)]()


def test_fuzzed_checkpoints_end_in_success_or_a_checkpoint_error_naming_the_file(tmp_path):
    """1,200 damaged files: each loads (tensors within the file's size) or is refused with a
    CheckpointError that names it; every 20th is traced: its Python allocations stay under
    four times the file size plus 1 MiB."""
    started, outcomes = time.perf_counter(), {"loaded": 0, "refused": 0}
    for index, content in enumerate(_mutants(seed=20240611, count=1200)):
        path = tmp_path / f"mutant{index}.pt"
        path.write_bytes(content)
        traced = index % 20 == 0
        if traced:
            tracemalloc.start()
        try:
            state = load_state_dict_file(path)
        except CheckpointError as error:
            assert str(path) in str(error) and "weights_only" not in str(error), error
            outcomes["refused"] += 1
        else:
            assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
            storages = {
                v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in state.values()
            }
            assert sum(storages.values()) <= len(content)
            outcomes["loaded"] += 1
        finally:
            if traced:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                assert peak <= 4 * len(content) + (1 << 20), (index, peak)
        path.unlink()
    assert outcomes["loaded"] > 50 and outcomes["refused"] > 500, outcomes
    assert time.perf_counter() - started < 30
