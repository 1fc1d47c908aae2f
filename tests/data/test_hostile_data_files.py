"""Hardening, round three (issue 21), local data sets: a FIFO in an image folder, CIFAR-10
pickles that declare arrays larger than their files, and reads that run out of memory."""

from __future__ import annotations

import os
import pickle
import struct
import threading
import tracemalloc
import warnings

import numpy as np
import pytest
from helpers.fake_data import write_cifar10, write_image_folder

from resode_lightning.core.io.arrays import _ArraysOnly
from resode_lightning.data import CIFAR10DataModule, DataError, ImageFolderDataModule
from resode_lightning.data.cifar10 import read_batch

# ----------------------------------------------------------------------------- image folder FIFO


@pytest.fixture
def fifo_folder(tmp_path):
    """An image folder with a FIFO named ``cat/fifo.jpg``; fails the test if anything opened the
    FIFO for reading (after 10 s a writer releases such a reader, so the test ends)."""
    write_image_folder(tmp_path, classes=("cat", "dog"), per_class=3, size=8)
    fifo = tmp_path / "cat" / "fifo.jpg"
    os.mkfifo(fifo)
    readers = []

    def release_reader() -> None:
        try:  # succeeds only while a reader waits on the FIFO
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            readers.append("a reader waited")
        except OSError:
            pass

    timer = threading.Timer(10, release_reader)
    timer.start()
    yield tmp_path, fifo
    timer.cancel()
    release_reader()
    assert readers == []


def test_image_folder_names_a_fifo_at_setup_without_opening_it(fifo_folder):
    """The header check opened cat/fifo.jpg and waited forever for a writer."""
    root, fifo = fifo_folder
    data = ImageFolderDataModule(str(root), image_size=8, num_workers=0)
    with pytest.raises(DataError) as error:
        data.setup("fit")
    message = str(error.value)
    assert message.startswith("1 of 7 image files")
    assert f"{fifo} (a FIFO (named pipe), not a regular file" in message
    assert data.train_set is None


def test_image_folder_skips_a_fifo_while_loading_without_opening_it(fifo_folder):
    root, fifo = fifo_folder
    data = ImageFolderDataModule(
        str(root), image_size=8, batch_size=2, augment=False, num_workers=0, check_limit=0
    )
    data.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = sum(len(b[1]) for b in data.train_dataloader())
        count += sum(len(b[1]) for b in data.val_dataloader())
    assert count == 7  # the FIFO's place taken by an image of its split
    assert data.skipped == [str(fifo)]
    assert any(f"skipped unreadable image {fifo} (a FIFO" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- CIFAR-10 sizes

_BIG = (100_000, 3072)  # 307,200,000 bytes of uint8
_SHAPE = b"J" + struct.pack("<i", _BIG[0]) + b"M" + struct.pack("<H", _BIG[1]) + b"\x86"
_UINT8 = b"cnumpy\ndtype\nX\x02\x00\x00\x00u1\x85R"
_NDARRAY_CALL = b"cnumpy\nndarray\n" + _SHAPE + _UINT8 + b"\x86R"
_RECONSTRUCT = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _SHAPE
_RECONSTRUCT += b"X\x01\x00\x00\x00B\x87R"


def _batch_pickle(data_ops: bytes) -> bytes:
    """A protocol-2 pickle of ``{"data": <what data_ops builds>, "labels": []}``."""
    return b"\x80\x02}(X\x04\x00\x00\x00data" + data_ops + b"X\x06\x00\x00\x00labels]u."


@pytest.mark.parametrize(
    "data_ops",
    [
        _NDARRAY_CALL,
        _RECONSTRUCT,
        # ndarray((100000, 3072), uint8, b"\0", 0, (0, 0)): a zero-stride view of one byte
        b"cnumpy\nndarray\n(" + _SHAPE + _UINT8 + b"C\x01\x00K\x00K\x00K\x00\x86tR",
    ],
    ids=["ndarray-call", "reconstruct", "zero-stride"],
)
def test_cifar10_batch_declaring_an_array_larger_than_its_file_is_refused(tmp_path, data_ops):
    """Six 200 KB batches declaring (100000, 3072) arrays were accepted as 495000 images."""
    write_cifar10(tmp_path, per_batch=4)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(_batch_pickle(data_ops) + bytes(200_000))
    data = CIFAR10DataModule(str(tmp_path), val_size=4, num_workers=0)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            data.setup("fit")
        assert tracemalloc.get_traced_memory()[1] < 32 * 2**20
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert message.startswith(f"{path} declares a uint8 array of shape (100000, 3072)")
    assert "307,200,000 bytes" in message and "200,0" in message
    assert data.train_set is None


def test_cifar10_array_filled_with_less_than_it_declares_is_refused(tmp_path):
    """numpy filled an object array from a short list and kept dangling pointers (a crash)."""
    objects = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85X\x01\x00\x00\x00b\x87R"
        b"(K\x01K\x02K\x03\x86cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R\x89]K\x00atb"
    )
    path = tmp_path / "data_batch_1"
    path.write_bytes(_batch_pickle(objects))
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch .* holding 1 items"):
        read_batch(path)
    whole = {b"data": np.arange(6, dtype=object).reshape(2, 3), b"labels": [0, 1]}
    path.write_bytes(pickle.dumps(whole, protocol=2))
    assert read_batch(path)["data"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "value_ops, refused",
    [
        (b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x03\x00\x00\x00hex\x86R", "codecs.encode"),
        (b"cbuiltins\ndict\n)R", "refused global builtins.dict"),
    ],
    ids=["codec", "builtin"],
)
def test_cifar10_pickle_calls_beyond_arrays_are_refused(tmp_path, value_ops, refused):
    path = tmp_path / "data_batch_1"
    path.write_bytes(_batch_pickle(value_ops))
    with pytest.raises(DataError, match=f"{path} is not a readable CIFAR-10 batch .*{refused}"):
        read_batch(path)


def test_cifar10_read_out_of_memory_names_the_file(tmp_path, monkeypatch):
    write_cifar10(tmp_path, per_batch=4)

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(_ArraysOnly, "load", no_memory)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(DataError, match=f"{path} does not fit in memory"):
        read_batch(path)
