"""The one place that decides which Lightning namespaces the package serves.

``pytorch_lightning`` is a dependency; when the unified ``lightning`` package is installed
too, the package's callbacks derive from both namespaces' ``Callback`` classes, so a Trainer
from either accepts them. ``ImageClassifier``, the DataModules and the ``resode`` command are
``pytorch_lightning`` classes: a LightningModule cannot derive from both namespaces'
``LightningModule`` (each Trainer then takes the other namespace's hooks for overrides and
refuses the module), so they serve ``pytorch_lightning.Trainer``.
"""

from __future__ import annotations

import pytorch_lightning as pl

try:
    import lightning.pytorch as lightning_pytorch
except ImportError:  # the unified package is optional
    lightning_pytorch = None

CALLBACK_BASES: tuple[type, ...] = (pl.Callback,)
if lightning_pytorch is not None:
    CALLBACK_BASES += (lightning_pytorch.Callback,)


class Callback(*CALLBACK_BASES):  # type: ignore[misc]
    """Base of the package's callbacks: a ``Callback`` of every installed Lightning namespace."""
