"""A minimal LightningModule holding a backbone under a nested attribute, random images, and a
quiet Trainer."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class NestedBackboneModule(pl.LightningModule):
    """A user's own module: the ResNet lives at ``self.net["backbone"]``, not a known attribute."""

    def __init__(self, backbone: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.net = nn.ModuleDict({"backbone": backbone})
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["backbone"](x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def random_images(
    count: int = 16, size: int = 32, classes: int = 10, seed: int = 0
) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, size, size, generator=generator)
    y = torch.randint(0, classes, (count,), generator=generator)
    return TensorDataset(x, y)


def loader(count: int = 16, size: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader:
    return DataLoader(random_images(count, size, seed=seed), batch_size=batch_size)


def quiet_trainer(namespace: ModuleType = pl, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer of ``namespace`` (``pytorch_lightning`` or ``lightning.pytorch``) without
    logger, checkpoints, progress bar or summary unless ``kwargs`` ask for them."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return namespace.Trainer(**{**options, **kwargs})
