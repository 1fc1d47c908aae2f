"""What the callbacks read of a Trainer run: a batch's input, the averaged copies of the model."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def first_tensor(batch: Any) -> Tensor | None:
    """The first tensor of a batch (a tensor, a list or tuple, or a dict of them), or ``None``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return first_tensor(batch[0])
    if isinstance(batch, dict) and batch:
        return first_tensor(next(iter(batch.values())))
    return None


def averaged_copies(trainer: Any) -> list[nn.Module]:
    """The averaged copies of the module that callbacks keep: ``WeightAveraging``'s
    ``AveragedModel`` and ``StochasticWeightAveraging``'s copy (their ``_average_model``)."""
    modules = []
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None)
        if isinstance(average, AveragedModel):
            average = average.module
        if isinstance(average, nn.Module) and average is not trainer.lightning_module:
            modules.append(average)
    return modules
