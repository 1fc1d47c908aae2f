"""DataModules reading local data only: scikit-learn's digits, CIFAR-10 on disk, image folders.

Internal: the promised API is the top-level ``resode_lightning``; names here may move.
"""

from resode_lightning.data.base import DataError, ImageDataModule
from resode_lightning.data.cifar10 import CIFAR10DataModule
from resode_lightning.data.digits import DigitsDataModule
from resode_lightning.data.image_folder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "DataError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
]
