"""DataModules on real and generated files: splits, pixel values, normalisation, error paths."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fake_data import CIFAR_CLASSES, write_cifar10, write_image_folder
from sklearn.datasets import load_digits

from resode_lightning.data import (
    CIFAR10DataModule,
    DataError,
    DigitsDataModule,
    ImageFolderDataModule,
)
from resode_lightning.data.cifar10 import MEAN, STD


def _all(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.stack([torch.as_tensor(v) for v in labels])


# ----------------------------------------------------------------------------- digits


def test_digits_splits_cover_the_1797_images_once_with_their_labels():
    data = DigitsDataModule(image_size=8, augment=False, seed=3)
    data.setup("fit")
    digits = load_digits()
    reference = {
        tuple(img.flatten().tolist()): int(t) for img, t in zip(digits.images, digits.target)
    }
    sizes, seen = [], []
    mean, std = data.train_set.transform.mean, data.train_set.transform.std
    for dataset in (data.train_set, data.val_set, data.test_set):
        images, labels = _all(dataset)
        sizes.append(len(labels))
        raw = (images * std[0] + mean[0]) * 16  # undo normalisation and the /16 scaling
        for image, label in zip(raw.round().to(torch.int64), labels):
            key = tuple(float(v) for v in image.flatten().tolist())
            assert reference[key] == int(label)
            seen.append(key)
    assert sizes == [1797 - 270 - 270, 270, 270]
    assert sorted(seen) == sorted(tuple(img.flatten().tolist()) for img in digits.images)


def test_digits_split_is_fixed_by_seed_and_training_split_is_normalised():
    first, again, other = (
        DigitsDataModule(image_size=16, augment=False, seed=s) for s in (0, 0, 1)
    )
    for data in (first, again, other):
        data.setup("fit")
    assert torch.equal(first.test_set.labels, again.test_set.labels)
    assert torch.equal(first.test_set.images, again.test_set.images)
    assert not torch.equal(first.test_set.images, other.test_set.images)
    images, _ = _all(first.train_set)
    assert images.shape == (1257, 1, 16, 16)
    assert abs(float(images.mean())) < 1e-4
    assert abs(float(images.std()) - 1) < 1e-3


def test_digits_augments_training_images_only_and_repeats_channels():
    data = DigitsDataModule(image_size=16, channels=3, augment=True)
    data.setup("fit")
    torch.manual_seed(0)
    a, b = data.train_set[0][0], data.train_set[0][0]
    assert a.shape == (3, 16, 16) and not torch.equal(a, b)
    assert torch.equal(a[0], a[1])
    assert torch.equal(data.val_set[0][0], data.val_set[0][0])
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (64, 3, 16, 16) and labels.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"image_size": 4}, "image_size must be at least 8"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum below 1"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_reads_the_python_batches(tmp_path, protocol):
    written = write_cifar10(tmp_path, per_batch=8, protocol=protocol)
    data = CIFAR10DataModule(str(tmp_path), batch_size=4, val_size=10, augment=False, num_workers=0)
    assert data.classes == CIFAR_CLASSES
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (30, 10, 8)
    # test images, un-normalised, are the written rows in channel-major layout
    images, labels = _all(data.test_set)
    raw, expected_labels = written["test_batch"]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    pixels = (images * std + mean) * 255
    expected = torch.from_numpy(raw.astype(np.float32)).view(-1, 3, 32, 32)
    assert torch.allclose(pixels, expected, atol=1e-3)
    assert labels.tolist() == expected_labels
    # train + val hold exactly the 40 training images
    train_images, _ = _all(data.train_set)
    val_images, _ = _all(data.val_set)
    rows = torch.cat([train_images, val_images]) * std + mean
    all_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected_rows = torch.from_numpy(all_train.astype(np.float32)).view(-1, 3, 32, 32) / 255
    key = lambda t: sorted(map(tuple, (t * 255).round().flatten(1).to(torch.int64).tolist()))  # noqa: E731
    assert key(rows) == key(expected_rows)


def test_cifar10_accepts_the_batch_directory_itself(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    data = CIFAR10DataModule(str(tmp_path / "cifar-10-batches-py"), val_size=4, num_workers=0)
    data.setup("fit")
    assert len(data.train_set) == 16


def test_cifar10_missing_copy_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10DataModule(str(tmp_path / "nowhere"))
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message and "download=True" in message


def test_cifar10_corrupt_batch_is_named(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    broken = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    broken.write_bytes(broken.read_bytes()[:100])
    data = CIFAR10DataModule(str(tmp_path), val_size=4, num_workers=0)
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        data.setup("fit")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_pickle_with_code_is_refused_without_running_it(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    marker = tmp_path / "executed"
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4, b"x": _Exploit(marker)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    data = CIFAR10DataModule(str(tmp_path), val_size=4, num_workers=0)
    with pytest.raises(DataError, match=r"refused global (posix|nt)\.system"):
        data.setup("fit")
    assert not marker.exists()


def test_cifar10_batch_with_wrong_shape_is_refused(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    batch = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_1 lacks a 'data' array of shape \(N, 3072\)"):
        CIFAR10DataModule(str(tmp_path), val_size=4, num_workers=0).setup("fit")


def _write_batch(tmp_path, name, batch):
    (tmp_path / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(batch, protocol=2))


_PIXELS = np.zeros((4, 3072), np.uint8)


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": _PIXELS.astype(object), b"labels": [0] * 4}, "'data' holds dtype object"),
        ({b"data": _PIXELS.astype(np.float32), b"labels": [0] * 4}, "'data' holds dtype float32"),
        (
            {b"data": np.full((4, 3072), 300, np.int64), b"labels": [0] * 4},
            "'data' holds values outside 0..255",
        ),
        ({b"data": _PIXELS - np.int16(1), b"labels": [0] * 4}, "'data' holds values outside"),
        ({b"data": _PIXELS, b"labels": [b"cat"] * 4}, r"'labels' must be .* found dtype \|S3"),
        ({b"data": _PIXELS, b"labels": [1.7] * 4}, "'labels' must be .* found dtype float64"),
        ({b"data": _PIXELS, b"labels": [True] * 4}, "'labels' must be .* found dtype bool"),
        (
            {b"data": _PIXELS, b"labels": [[0], [1, 2], 3, 4]},
            "'labels' must be .* found a list that is not a flat",
        ),
        ({b"data": _PIXELS, b"labels": {0: 1}}, "'labels' must be .* found a dict that is not"),
    ],
    ids=[
        "object",
        "float-pixels",
        "int64-300",
        "negative",
        "str-labels",
        "float-labels",
        "bool-labels",
        "ragged-labels",
        "dict-labels",
    ],
)
def test_cifar10_refuses_batches_it_would_misread(tmp_path, batch, message):
    """Object or float pixels, pixels outside 0..255 and labels that are not integers were
    truncated or converted silently, or raised raw numpy errors."""
    write_cifar10(tmp_path, per_batch=4)
    _write_batch(tmp_path, "data_batch_2", batch)
    data = CIFAR10DataModule(str(tmp_path), val_size=4, num_workers=0)
    with pytest.raises(DataError, match=f"data_batch_2: {message}") as error:
        data.setup("fit")
    assert "cifar-10-python.tar.gz" in str(error.value)
    assert data.train_set is None


def test_cifar10_unreadable_files_are_named(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    directory = tmp_path / "cifar-10-batches-py"
    # an encoding pickle never uses: codecs raised LookupError
    (directory / "test_batch").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x03"
                                           b"\x00\x00\x00zzz\x86R.")  # fmt: skip
    data = CIFAR10DataModule(str(tmp_path), val_size=4, num_workers=0)
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR-10 batch"):
        data.setup("fit")
    (directory / "batches.meta").unlink()
    with pytest.raises(DataError, match="batches.meta cannot be read"):
        data.classes  # noqa: B018
    _write_batch(tmp_path, "batches.meta", {b"label_names": 7})
    with pytest.raises(DataError, match="'label_names' is not a list of names"):
        data.classes  # noqa: B018


# ----------------------------------------------------------------------------- image folders


def test_image_folder_with_train_and_val_folders(tmp_path):
    write_image_folder(tmp_path / "train", classes=("cat", "dog", "eel"), per_class=3)
    write_image_folder(tmp_path / "val", classes=("cat", "dog", "eel"), per_class=2, seed=1)
    data = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4, num_workers=0)
    assert data.num_classes == 3 and data.classes == ["cat", "dog", "eel"]
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (9, 6, 6)
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1]


def test_image_folder_without_split_folders_is_split_by_seed(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b"), per_class=5)
    data = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.2, num_workers=0)
    data.setup("fit")
    train = set(data.train_set.indices)
    val = set(data.val_set.indices)
    assert len(val) == 2 and len(train) == 8 and not train & val


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected DATA_DIR/train/<class>"):
        ImageFolderDataModule(str(tmp_path / "missing"))
    write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    write_image_folder(tmp_path / "val", classes=("a", "c"), per_class=2)
    data = ImageFolderDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(DataError, match=r"class folders of .*val.* \['a', 'c'\] differ"):
        data.setup("fit")


def _truncate(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def test_image_folder_names_files_that_are_not_images_at_setup(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    write_image_folder(tmp_path / "val", classes=("a", "b"), per_class=2)
    (tmp_path / "train" / "a" / "text.png").write_text("not an image")
    (tmp_path / "val" / "b" / "empty.jpg").write_bytes(b"")
    data = ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0)
    with pytest.raises(DataError) as error:
        data.setup("fit")
    message = str(error.value)
    assert message.startswith("2 of 10 image files under")
    for name in ("train/a/text.png", "val/b/empty.jpg"):
        assert f"{tmp_path / name} (not an image file PIL can identify)" in message
    assert "remove or replace them" in message
    assert (data.train_set, data.val_set, data.test_set) == (None, None, None)


def test_image_folder_skips_images_that_fail_to_decode_with_a_warning(tmp_path):
    """A truncated image passes the header check and failed mid-training; now it is skipped
    (its place taken by the next image of the same split), named and counted."""
    write_image_folder(tmp_path, classes=("a", "b"), per_class=5)
    data = ImageFolderDataModule(
        str(tmp_path), image_size=8, batch_size=4, val_fraction=0.2, augment=False, num_workers=0
    )
    data.setup("fit")
    broken = [data.train_set.dataset.samples[i][0] for i in data.train_set.indices[:2]]
    for path in broken:
        _truncate(Path(path))
    with pytest.warns(UserWarning, match="skipped unreadable image") as caught:
        labels = torch.cat([batch[1] for batch in data.train_dataloader()])
    assert len(labels) == 8
    messages = [str(w.message) for w in caught if "skipped unreadable" in str(w.message)]
    assert len(messages) == 2
    assert {m.split()[3] for m in messages} == set(broken)
    assert messages[-1].split("; ")[-1].startswith("2 image(s) of")
    assert data.skipped == sorted(broken)
    folder, train = data.train_set.dataset, sorted(data.train_set.indices)
    readable = [i for i in train if folder.samples[i][0] not in broken]
    for position in data.train_set.indices[:2]:  # the next readable training image stands in
        stand_in = next((i for i in readable if i > position), readable[0])
        assert torch.equal(folder[position][0], folder[stand_in][0])


def test_image_folder_counts_skipped_images_over_loader_workers(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=3)
    write_image_folder(tmp_path / "val", classes=("a", "b"), per_class=1)
    _truncate(tmp_path / "train" / "a" / "1.png")
    (tmp_path / "train" / "b" / "bad.png").write_text("not an image")
    data = ImageFolderDataModule(
        str(tmp_path), image_size=8, batch_size=2, num_workers=2, check_limit=0
    )
    data.setup("fit")  # check_limit=0: no file is opened at setup
    assert sum(len(batch[1]) for batch in data.train_dataloader()) == 7
    assert data.skipped == [str(tmp_path / "train/a/1.png"), str(tmp_path / "train/b/bad.png")]


def test_image_folder_with_every_image_unreadable(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/0.png", "a/1.png", "b/0.png"):
        (tmp_path / name).write_text("x")
    data = ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0, check_limit=0)
    data.setup("fit")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 3 images"):
        data.train_set[0]
    with pytest.raises(ValueError, match="check_limit must be >= 0"):
        ImageFolderDataModule(str(tmp_path), check_limit=-1)
