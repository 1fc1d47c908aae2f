"""The Lightning module that trains residual backbones (torchvision, ``ode_resnet``, your own)."""

from resode_lightning.lit.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
