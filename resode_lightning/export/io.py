"""Save and load exported neural ODEs: weights plus a JSON configuration, no pickled objects.

The file is a ``torch.save`` of ``{"config": <JSON text>, "state_dict": {...}}``: it loads with
``torch.load(..., weights_only=True)``. The configuration names the source architecture and the
export options; loading rebuilds that architecture, exports it with the same options and loads
the weights strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from resode_lightning.core.io import CheckpointError, atomic_save
from resode_lightning.export.build import export_neural_ode, exported_config
from resode_lightning.export.source import build_source

FORMAT = "resode-neural-ode/1"


def save_neural_ode(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write an exported model to ``path`` atomically (whole or not at all).

    Args:
        module: a model returned by :func:`export_neural_ode` (possibly fine-tuned since).
        path: the output file; its directory must exist.

    Returns:
        The path written.

    Raises:
        ValueError: ``module`` was not made by ``export_neural_ode``, or from an architecture
            that cannot be rebuilt by name (only torchvision ResNets and ``ode_resnet`` can).
    """
    config = exported_config(module)
    if config["source"] is None:
        raise ValueError(
            f"cannot save this export: its source {type(module).__name__} is not a torchvision "
            f"ResNet or an ode_resnet, so it cannot be rebuilt by name; save module.state_dict() "
            f"and re-export your architecture before loading it"
        )
    text = json.dumps({"format": FORMAT, **config}, sort_keys=True)
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    return atomic_save({"config": text, "state_dict": state}, path)


def load_neural_ode(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Read a model written by :func:`save_neural_ode` (without unpickling anything), in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a saved neural ODE, or its weights do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"neural ODE file {str(path)!r} does not exist or is not a file")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable neural ODE file: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("config"), str):
        raise CheckpointError(
            f"{path} is not a neural ODE file written by save_neural_ode (no config)"
        )
    config = json.loads(content["config"])
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}")
    model = export_neural_ode(build_source(config["source"]), **config["export"])
    try:
        model.load_state_dict(content["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match its own configuration: {error}") from None
    return model.to(map_location).eval()
