"""Image folders
=============

Your own images, one sub-folder per class, read with torchvision's ``ImageFolder``.

Files that are not readable images are reported with their paths at setup when the data set is
small enough to check every file's header there (``check_limit``); images that still fail to
decode while loading are skipped with a warning, and listed by ``skipped``. Paths that are not
regular files (a FIFO, a device, a socket named ``*.jpg``) count as unreadable images and are
never opened: reading a FIFO would wait for a writer forever.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader, find_classes
from torchvision.transforms import v2

from resode_lightning.data.base import DataError, ImageDataModule, split_indices

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LAYOUT = (
    "expected DATA_DIR/train/<class>/*.jpg and DATA_DIR/val/<class>/*.jpg (optionally "
    "DATA_DIR/test/<class>/...), or DATA_DIR/<class>/*.jpg to be split by val_fraction"
)


class _SkippingImageFolder(ImageFolder):
    """An ``ImageFolder`` whose unreadable images give their place to the next readable one of
    the same split.

    Each skipped image is named in a warning; ``skipped`` lists them, as found by every loader
    worker.
    """

    def __init__(self, root: str, transform: Callable[[Any], Any]) -> None:
        super().__init__(root, transform=transform, loader=_load_image)
        self._unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self._other_split = torch.zeros(len(self.samples), dtype=torch.bool)

    def serve_only(self, indices: list[int]) -> None:
        """Take the places of skipped images with images of ``indices`` only (a split's)."""
        self._other_split.fill_(True)
        self._other_split[indices] = False

    @property
    def skipped(self) -> list[str]:
        """The paths of the images skipped so far."""
        return [self.samples[i][0] for i in self._unreadable.nonzero().flatten().tolist()]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        count = len(self.samples)
        for offset in range(count):
            position = (index + offset) % count
            if self._unreadable[position] or self._other_split[position]:
                continue
            path, target = self.samples[position]
            try:
                image = self.loader(path)
            except Exception as error:  # PIL raises many types on damaged files
                self._unreadable[position] = True
                warnings.warn(
                    f"skipped unreadable image {path} ({_reason(error)}); "
                    f"{int(self._unreadable.sum())} image(s) of {self.root!r} skipped so far",
                    stacklevel=2,
                )
                continue
            return self.transform(image), target
        raise DataError(f"none of the {count} images in {self.root!r} can be read")


_SPECIAL_FILES = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _check_regular(path: str) -> None:
    """Raise ``OSError`` unless ``path`` is a regular file (or a link to one); it is not opened."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), "a special file")
        raise OSError(f"{kind}, not a regular file; it was not opened")


def _load_image(path: str) -> Any:
    """The image at ``path`` (torchvision's default loader), refused unless a regular file."""
    _check_regular(path)
    return default_loader(path)


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can identify"
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


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
        check_limit: data sets of at most this many images have every file's header read at
            setup; larger ones find unreadable images only while loading.

    Raises:
        FileNotFoundError: ``data_dir`` (or a split folder) is missing.
        DataError: the class folders of the splits differ, or a split holds no images; at
            setup, files that are not readable images (with their paths).

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
        check_limit: int = 20_000,
    ) -> None:
        super().__init__(batch_size, num_workers)
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist; " + LAYOUT)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if check_limit < 0:
            raise ValueError(f"check_limit must be >= 0, got {check_limit}")
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
        self.check_limit = check_limit
        self._folders: list[_SkippingImageFolder] = []
        self.save_hyperparameters()

    @property
    def skipped(self) -> list[str]:
        """The images skipped so far because they could not be decoded."""
        return sorted({path for folder in self._folders for path in folder.skipped})

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

    def _folder(self, path: Path, transform: v2.Transform) -> _SkippingImageFolder:
        try:
            folder = _SkippingImageFolder(str(path), transform=transform)
        except FileNotFoundError as error:
            raise DataError(f"{error}; {LAYOUT}") from None
        if folder.classes != self.classes:
            raise DataError(
                f"class folders of {str(path)!r} {folder.classes} differ from the training "
                f"classes {self.classes}"
            )
        return folder

    def _check_files(self, folders: list[_SkippingImageFolder]) -> None:
        """Raise ``DataError`` naming the files that are not readable images, when at most
        ``check_limit`` are to be checked."""
        paths = [path for folder in folders for path, _ in folder.samples]
        if len(paths) > self.check_limit:
            return
        unreadable = []
        for path in paths:
            try:
                _check_regular(path)
                with Image.open(path):  # reads the header only
                    pass
            except Exception as error:  # PIL raises many types on damaged files
                unreadable.append(f"{path} ({_reason(error)})")
        if unreadable:
            shown = "; ".join(unreadable[:5]) + ("; ..." if len(unreadable) > 5 else "")
            raise DataError(
                f"{len(unreadable)} of {len(paths)} image files under {str(self.root)!r} cannot "
                f"be read as images: {shown}; remove or replace them"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_transform, evaluate = self._transforms()
        if self.split_dirs:
            train = self._folder(self.root / "train", train_transform)
            val = self._folder(self.root / "val", evaluate)
            test_root = self.root / "test"
            test = self._folder(test_root, evaluate) if test_root.is_dir() else val
            folders = [train, val] + ([test] if test is not val else [])
            self._check_files(folders)
            self._folders = folders
            self.train_set, self.val_set, self.test_set = train, val, test
            return
        train_view = self._folder(self.root, train_transform)
        eval_view = self._folder(self.root, evaluate)
        count = len(train_view)
        val_count = max(1, round(self.val_fraction * count))
        if val_count >= count:
            raise DataError(f"{count} image(s) in {str(self.root)!r} are too few to split")
        self._check_files([train_view])
        val, train = (part.tolist() for part in split_indices(count, (val_count,), self.seed))
        train_view.serve_only(train)
        eval_view.serve_only(val)
        self._folders = [train_view, eval_view]
        self.train_set: Dataset = Subset(train_view, train)
        self.val_set = Subset(eval_view, val)
        self.test_set = self.val_set
