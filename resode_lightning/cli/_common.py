"""What several subcommands share: a torchvision ResNet from a state dict, an output check."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resode_lightning.core.io import load_into
from resode_lightning.core.models import torchvision_resnet


def torchvision_from_state_dict(state_dict: dict[str, Tensor], arch: str) -> nn.Module:
    """A torchvision ``arch`` with the head size and weights of ``state_dict``, in eval mode."""
    heads = [v for k, v in state_dict.items() if k.endswith("fc.weight") and v.dim() == 2]
    if not heads:
        raise ValueError(f"the checkpoint has no 'fc.weight' key: it is not a {arch} state dict")
    model = torchvision_resnet(arch, num_classes=heads[0].shape[0])
    return load_into(model, state_dict).eval()


@torch.no_grad()
def output_change(reference: nn.Module, model: nn.Module, size: int = 64) -> float:
    """max |y_model - y_reference| / max |y_reference| on a fixed random batch, in eval mode."""
    batch = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = reference.eval()(batch)
    return float((model.eval()(batch) - expected).abs().max() / expected.abs().max())
