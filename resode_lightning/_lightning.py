"""The one place that decides which Lightning namespaces the package serves.

``pytorch_lightning`` is a dependency; the unified ``lightning`` package is optional. When it is
installed, the package serves both namespaces' Trainers:

- the callbacks and the DataModules derive from both namespaces' ``Callback`` and
  ``LightningDataModule`` (:class:`Callback`, :class:`LightningDataModule` below), so a Trainer
  of either accepts them;
- a ``LightningModule`` cannot derive from both (each Trainer takes the other namespace's hooks
  for overrides and refuses the module, for example for overriding both ``configure_model``
  and ``configure_sharded_model``), so ``ImageClassifier`` comes twice, from one mixin:
  ``resode_lightning.ImageClassifier`` for ``pytorch_lightning`` and
  ``resode_lightning.lit.lightning_pytorch.ImageClassifier`` for ``lightning.pytorch``;
- the ``resode`` command runs ``pytorch_lightning``'s LightningCLI and Trainer.
"""

from __future__ import annotations

import pytorch_lightning as pl

try:
    import lightning.pytorch as lightning_pytorch
except ImportError:  # the unified package is optional
    lightning_pytorch = None

CALLBACK_BASES: tuple[type, ...] = (pl.Callback,)
DATAMODULE_BASES: tuple[type, ...] = (pl.LightningDataModule,)
if lightning_pytorch is not None:
    CALLBACK_BASES += (lightning_pytorch.Callback,)
    DATAMODULE_BASES += (lightning_pytorch.LightningDataModule,)


class Callback(*CALLBACK_BASES):  # type: ignore[misc]
    """Base of the package's callbacks: a ``Callback`` of every installed Lightning namespace."""


class LightningDataModule(*DATAMODULE_BASES):  # type: ignore[misc]
    """Base of the package's DataModules: a ``LightningDataModule`` of every installed
    Lightning namespace."""
