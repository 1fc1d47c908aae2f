"""DataModules on real and generated files: splits, pixel values, normalisation, error paths."""

from __future__ import annotations

import os
import pickle

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
