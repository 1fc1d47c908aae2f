"""The package's LightningModule for the unified ``lightning`` package's Trainer.

``lightning.pytorch.Trainer`` accepts only ``lightning.pytorch`` modules, and a module cannot
derive from both namespaces (see :mod:`resode_lightning._lightning`); this is
:class:`resode_lightning.ImageClassifier` on the ``lightning.pytorch`` base. The DataModules
and callbacks serve both Trainers as they are. Needs ``pip install lightning``.

Example::

    >>> import lightning.pytorch as L
    >>> from resode_lightning.lit.lightning_pytorch import ImageClassifier
    >>> isinstance(ImageClassifier(), L.LightningModule)
    True
"""

from __future__ import annotations

import lightning.pytorch as L

from resode_lightning.lit.classifier import ImageClassifierMixin


class ImageClassifier(ImageClassifierMixin, L.LightningModule):
    """:class:`resode_lightning.ImageClassifier` (same arguments, metrics and optimisers) as a
    ``lightning.pytorch.LightningModule``."""
