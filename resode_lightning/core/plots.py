"""Pictures of a smoothness history: depth × training-step heatmaps, Lipschitz curves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from resode_lightning.core.io import atomic_write
from resode_lightning.core.smoothness import METRICS


def plot_smoothness(history: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Draw a smoothness history into a PNG file, one row of panels per stage.

    Left: heatmap of ``||θ_{k+1} - θ_k||`` (all parameters of a block as one vector), depth
    index ``k`` against training step. Right: the Lipschitz constant in depth over steps.

    Args:
        history: :attr:`SmoothnessMonitor.history <resode_lightning.SmoothnessMonitor.history>`
            (or the ``"history"`` entry of its checkpoint state): ``{stage: {"step",
            "metrics", "depth_profile", ...}}``.
        path: the PNG file to write; it appears whole or not at all.

    Returns:
        ``path``.

    Raises:
        ValueError: the history holds no measurement.
    """
    stages = [name for name, record in history.items() if len(record["step"])]
    if not stages:
        raise ValueError("the smoothness history holds no measurement to plot")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 2.8 * len(stages)), layout="constrained")
    axes = figure.subplots(len(stages), 2, squeeze=False, width_ratios=(3, 2))
    lipschitz = METRICS.index("lipschitz")
    for row, name in zip(axes, stages, strict=True):
        record = history[name]
        steps = torch.as_tensor(record["step"]).double().numpy()
        profile = torch.as_tensor(record["depth_profile"]).float()
        depth_index = torch.arange(1, profile.shape[1] + 1).numpy()
        mesh = row[0].pcolormesh(steps, depth_index, profile.T.numpy(), shading="nearest")
        figure.colorbar(mesh, ax=row[0], label=r"$\|\theta_{k+1}-\theta_k\|$")
        row[0].set_title(f"{name}: step size in depth")
        row[0].set_xlabel("training step")
        row[0].set_ylabel("k")
        values = torch.as_tensor(record["metrics"])[:, 0, lipschitz].numpy()
        row[1].plot(steps, values, marker="." if len(steps) < 50 else None)
        row[1].set_title("Lipschitz constant in depth")
        row[1].set_xlabel("training step")
        row[1].set_ylabel(r"$L \max_k \|\theta_{k+1}-\theta_k\|$")

    return atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
