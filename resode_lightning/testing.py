"""Helpers for tests, benchmarks and the demo: networks that behave like trained ones.

Not part of the package's API; like ``torch.testing``, importable by users' own tests.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

NORMS = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm of ``model`` random statistics and affine parameters, in place.

    BatchNorm (and torchvision's ``FrozenBatchNorm2d``) get running means in ``[-0.5, 0.5]``
    and variances in ``[0.5, 2]``; every affine norm (GroupNorm too) weights in ``[0.5, 1.5]``
    and biases in ``[-0.2, 0.2]``. A randomly initialised net has identity norms (timm even
    zero-initialises the last norm of each block, so every branch vanishes), which hides
    mistakes in conversions and exports; this makes it behave like a trained one for such
    checks. Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.empty(like.shape).uniform_(low, high, generator=generator)

    for module in model.modules():
        if not isinstance(module, NORMS):
            continue
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(draw(module.running_mean, -0.5, 0.5))
            module.running_var.copy_(draw(module.running_var, 0.5, 2.0))
        elif not isinstance(module, nn.GroupNorm):
            continue  # a BatchNorm on batch statistics only
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(draw(module.weight, 0.5, 1.5))
            module.bias.copy_(draw(module.bias, -0.2, 0.2))
    return model
