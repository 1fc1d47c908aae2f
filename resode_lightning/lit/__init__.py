"""The Lightning module that trains residual backbones (torchvision, ``ode_resnet``, your own).

Internal: the promised API is the top-level ``resode_lightning``; names here may move.
"""

from resode_lightning.lit.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
