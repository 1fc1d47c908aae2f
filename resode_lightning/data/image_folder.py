"""Image folders
=============

Your own images, one sub-folder per class, read with torchvision's ``ImageFolder``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from resode_lightning.data.base import DataError, ImageDataModule, split_indices

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LAYOUT = (
    "expected DATA_DIR/train/<class>/*.jpg and DATA_DIR/val/<class>/*.jpg (optionally "
    "DATA_DIR/test/<class>/...), or DATA_DIR/<class>/*.jpg to be split by val_fraction"
)


class ImageFolderDataModule(ImageDataModule):
    """RGB images from class sub-folders, with ImageNet-style transforms.

    With ``data_dir/train`` and ``data_dir/val`` present those are the splits (``data_dir/test``
    too when present, else validation images are also the test set); otherwise the class
    folders of ``data_dir`` are split into train and validation by ``seed``. Training images
    get a random resized crop and a horizontal flip; evaluation images a resize to
    ``image_size * 8 / 7`` and a centre crop. All are normalised with ImageNet statistics.

    Args:
        data_dir: the image root (see above).
        image_size: side of the square crops fed to the model.
        batch_size: samples per batch.
        val_fraction: share of images held out when there is no ``val`` folder.
        seed: seed of that split.
        augment: augment the training images.
        num_workers: DataLoader worker processes.

    Raises:
        FileNotFoundError: ``data_dir`` (or a split folder) is missing.
        DataError: the class folders of the splits differ, or a split holds no images.

    Example::

        >>> from pathlib import Path
        >>> for name in ("cat", "dog"):  # photos/cat/*.jpg, photos/dog/*.jpg
        ...     (Path("photos") / name).mkdir(parents=True)
        >>> data = ImageFolderDataModule("photos", image_size=224)
        >>> data.num_classes  # one per sub-folder
        2
    """

    channels = 3

    def __init__(
        self,
        data_dir: str = "data",
        image_size: int = 224,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 4,
    ) -> None:
        super().__init__(batch_size, num_workers)
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist; " + LAYOUT)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root = root
        self.split_dirs = (root / "train").is_dir() and (root / "val").is_dir()
        train_root = root / "train" if self.split_dirs else root
        try:
            self.classes, _ = find_classes(str(train_root))
        except FileNotFoundError as error:
            raise DataError(f"{error}; {LAYOUT}") from None
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment
        self.save_hyperparameters()

    def _transforms(self) -> tuple[v2.Transform, v2.Transform]:
        tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        evaluate = v2.Compose(
            [v2.Resize(self.image_size * 8 // 7), v2.CenterCrop(self.image_size), *tail]
        )
        if not self.augment:
            return evaluate, evaluate
        train = v2.Compose(
            [v2.RandomResizedCrop(self.image_size), v2.RandomHorizontalFlip(), *tail]
        )
        return train, evaluate

    def _folder(self, path: Path, transform: v2.Transform) -> ImageFolder:
        try:
            folder = ImageFolder(str(path), transform=transform)
        except FileNotFoundError as error:
            raise DataError(f"{error}; {LAYOUT}") from None
        if folder.classes != self.classes:
            raise DataError(
                f"class folders of {str(path)!r} {folder.classes} differ from the training "
                f"classes {self.classes}"
            )
        return folder

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_transform, evaluate = self._transforms()
        if self.split_dirs:
            self.train_set = self._folder(self.root / "train", train_transform)
            self.val_set = self._folder(self.root / "val", evaluate)
            test_root = self.root / "test"
            self.test_set = (
                self._folder(test_root, evaluate) if test_root.is_dir() else self.val_set
            )
            return
        train_view = self._folder(self.root, train_transform)
        eval_view = self._folder(self.root, evaluate)
        count = len(train_view)
        val_count = max(1, round(self.val_fraction * count))
        if val_count >= count:
            raise DataError(f"{count} image(s) in {str(self.root)!r} are too few to split")
        val, train = split_indices(count, (val_count,), self.seed)
        self.train_set: Dataset = Subset(train_view, train.tolist())
        self.val_set = Subset(eval_view, val.tolist())
        self.test_set = self.val_set
