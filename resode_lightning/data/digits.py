"""Digits
======

scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes): the data set
that needs no download, used by the demo and the digits configs.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from resode_lightning.data.base import ImageDataModule, TensorImages, split_indices


class DigitsDataModule(ImageDataModule):
    """The 8x8 digits resized to ``image_size``, split train/val/test by ``seed``, normalised.

    Pixel values (0…16) are scaled to [0, 1], resized bilinearly, then normalised with the
    training split's mean and standard deviation. Training images get a light augmentation
    (random crop with padding and a small random affine map); evaluation images none.

    Args:
        image_size: side of the square images fed to the model (at least 8).
        channels: 1 (grey) or 3 (the grey image repeated, for RGB backbones).
        batch_size: samples per batch.
        val_fraction: share of the 1,797 images held out for validation.
        test_fraction: share held out for testing.
        seed: seed of the split (the same seed gives the same split on every machine).
        augment: augment the training images.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: an argument out of range.

    Example::

        >>> data = DigitsDataModule(image_size=16)
        >>> data.setup("fit")
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> images.shape
        torch.Size([64, 1, 16, 16])
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be positive with a sum below 1, got "
                f"{val_fraction} and {test_fraction}"
            )
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.augment = augment
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.clamp(0, 1).repeat(1, self.channels, 1, 1)
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        count = len(labels)
        val, test, train = split_indices(
            count, (round(self.val_fraction * count), round(self.test_fraction * count)), self.seed
        )
        mean = images[train].mean(dim=(0, 2, 3)).tolist()
        std = images[train].std(dim=(0, 2, 3)).tolist()
        normalize = v2.Normalize(mean, std)
        train_transform = normalize
        if self.augment:
            pad = max(1, self.image_size // 8)
            train_transform = v2.Compose(
                [
                    v2.RandomCrop(self.image_size, padding=pad),
                    v2.RandomAffine(degrees=10, scale=(0.9, 1.1)),
                    normalize,
                ]
            )
        self.train_set = TensorImages(images[train], labels[train], train_transform)
        self.val_set = TensorImages(images[val], labels[val], normalize)
        self.test_set = TensorImages(images[test], labels[test], normalize)
