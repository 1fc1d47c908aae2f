"""CIFAR-10 from a local copy
==========================

Reads the standard python-pickle batches (``cifar-10-batches-py``) from disk; nothing is
downloaded. The pickles are read by the package's safe reader of numpy-array pickles
(:func:`~resode_lightning.core.io.arrays.read_array_pickle`): a tampered file cannot run code,
and every array's declared size is checked against the file's size before it is allocated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from resode_lightning.core.io.arrays import ArrayPickleError, read_array_pickle
from resode_lightning.data.base import DataError, ImageDataModule, TensorImages, split_indices

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
HOW_TO_GET = (
    "get it with: curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz && "
    "tar xzf cifar-10-python.tar.gz -C DATA_DIR (or torchvision.datasets.CIFAR10(DATA_DIR, "
    "download=True) on a machine with network access)"
)


def read_batch(path: str | os.PathLike) -> dict[str, Any]:
    """One CIFAR batch file as a dict with ``str`` keys, read without executing any code, each
    array's declared size checked against the file's size before it is allocated.

    Raises:
        DataError: the file is not a readable CIFAR batch (corrupt, truncated, other objects,
            arrays larger than the file), or does not fit in memory.
    """
    path = Path(path)
    try:
        content = read_array_pickle(path, what="CIFAR-10 batch", advice=HOW_TO_GET)
    except ArrayPickleError as error:
        raise DataError(str(error)) from None
    if not isinstance(content, dict):
        raise DataError(
            f"{path} holds {type(content).__name__}, not a CIFAR-10 batch dict; {HOW_TO_GET}"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _images_and_labels(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if (
        not isinstance(data, np.ndarray)
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels is None
    ):
        raise DataError(
            f"{path} lacks a 'data' array of shape (N, 3072) and 'labels'; it is not a CIFAR-10 "
            f"batch; {HOW_TO_GET}"
        )
    if data.dtype.kind not in "iu" or (
        data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255)
    ):
        found = f"dtype {data.dtype}" if data.dtype.kind not in "iu" else "values outside 0..255"
        raise DataError(
            f"{path}: 'data' holds {found}; CIFAR-10 pixels are integers 0..255 (uint8). The "
            f"file is damaged or not a CIFAR-10 batch; {HOW_TO_GET}"
        )
    given = labels
    try:
        labels = np.asarray(given)
    except ValueError:  # nested lists of different lengths
        labels = None
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        flat = labels is not None and labels.ndim == 1
        found = (
            f"dtype {labels.dtype}" if flat else f"a {type(given).__name__} that is not a flat list"
        )
        raise DataError(
            f"{path}: 'labels' must be a list of integers 0..9, found {found}; the file is "
            f"damaged or not a CIFAR-10 batch; {HOW_TO_GET}"
        )
    if len(labels) != len(data) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(
            f"{path}: {len(data)} images but {len(labels)} labels in 0..9; {HOW_TO_GET}"
        )
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels.astype(np.int64))


def find_batch_dir(data_dir: str | os.PathLike) -> Path:
    """The directory holding the batch files: ``data_dir/cifar-10-batches-py`` or ``data_dir``.

    Raises:
        FileNotFoundError: neither holds all batch files; the message names both places.
    """
    data_dir = Path(data_dir)
    candidates = (data_dir / BATCH_DIR, data_dir)
    needed = (*TRAIN_FILES, TEST_FILE)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in needed):
            return candidate
    looked = " and ".join(repr(str(c)) for c in candidates)
    raise FileNotFoundError(
        f"no CIFAR-10 python batches ({', '.join(needed)}) in {looked}; "
        + HOW_TO_GET.replace("DATA_DIR", str(data_dir))
    )


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 read from ``data_dir`` (``download=False``): 45k/5k train/val split, 10k test.

    Training images get random crops (4-pixel padding) and horizontal flips; all images are
    normalised with the usual CIFAR-10 channel statistics.

    Args:
        data_dir: a directory holding ``cifar-10-batches-py/`` (as extracted from
            ``cifar-10-python.tar.gz``), or that directory itself.
        batch_size: samples per batch.
        val_size: training images held out for validation (seeded split).
        seed: seed of the split.
        augment: augment the training images.
        num_workers: DataLoader worker processes.

    Raises:
        FileNotFoundError: (at construction) the batch files are not there; the message says
            where it looked and how to get them.
        DataError: (at setup) a batch file is corrupt or not in the CIFAR-10 format.

    Example, with the batches in ``~/data/cifar-10-batches-py``::

        >>> data = CIFAR10DataModule("~/data")  # doctest: +SKIP
        >>> data.classes[:2]  # doctest: +SKIP
        ['airplane', 'automobile']
    """

    num_classes = 10
    channels = 3

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if val_size < 1:
            raise ValueError(f"val_size must be positive, got {val_size}")
        self.batch_dir = find_batch_dir(Path(data_dir).expanduser())
        self.val_size = val_size
        self.seed = seed
        self.augment = augment
        self.save_hyperparameters()

    @property
    def classes(self) -> list[str]:
        """The class names from ``batches.meta`` (``airplane`` … ``truck``)."""
        path = self.batch_dir / META_FILE
        names = read_batch(path).get("label_names", [])
        if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
            raise DataError(f"{path}: 'label_names' is not a list of names; {HOW_TO_GET}")
        return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        parts = [_images_and_labels(self.batch_dir / name) for name in TRAIN_FILES]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if self.val_size >= len(images):
            raise ValueError(
                f"val_size={self.val_size} leaves no training images out of {len(images)}"
            )
        val, train = split_indices(len(images), (self.val_size,), self.seed)
        test_images, test_labels = _images_and_labels(self.batch_dir / TEST_FILE)
        evaluate = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        train_transform = evaluate
        if self.augment:
            train_transform = v2.Compose(
                [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), evaluate]
            )
        self.train_set = TensorImages(images[train], labels[train], train_transform)
        self.val_set = TensorImages(images[val], labels[val], evaluate)
        self.test_set = TensorImages(test_images, test_labels, evaluate)
