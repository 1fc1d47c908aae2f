"""What every DataModule of the package shares: class count, channels, loaders."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from resode_lightning._lightning import LightningDataModule


class DataError(ValueError):
    """A local data set that is present but unreadable (corrupt, truncated, wrong format)."""


class TensorImages(Dataset):
    """Images in one tensor ``(N, C, H, W)``, integer labels, an optional per-item transform."""

    def __init__(
        self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def split_indices(count: int, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    """A seeded random partition of ``range(count)`` into parts of ``sizes`` and the rest, last."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    parts.append(order[start:])
    return parts


class ImageDataModule(LightningDataModule):
    """Base of the package's DataModules: ``num_classes`` and ``channels`` known at construction.

    Subclasses set ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup``; the
    predict loader runs over the test set.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
    """

    num_classes: int
    channels: int

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}"
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.setup() must run before its loaders are used"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
