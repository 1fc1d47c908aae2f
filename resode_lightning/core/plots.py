"""Pictures of a smoothness history: depth × training-step heatmaps, Lipschitz curves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from resode_lightning.core.files import atomic_write
from resode_lightning.core.history import SmoothnessHistory

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def smoothness_figure(history: SmoothnessHistory | Mapping[str, Mapping[str, Any]]) -> Figure:
    """A matplotlib figure of a smoothness history, one row of panels per stage.

    Left: heatmap of ``||θ_{k+1} - θ_k||`` (all parameters of a block as one vector), depth
    index ``k`` against training step. Right: the Lipschitz constant in depth over steps.

    Args:
        history: a :class:`~resode_lightning.core.history.SmoothnessHistory`, or its
            :meth:`~resode_lightning.core.history.SmoothnessHistory.state_dict` such as
            :attr:`SmoothnessMonitor.history <resode_lightning.SmoothnessMonitor.history>` or
            the ``"history"`` entry of the monitor's checkpoint state.

    Raises:
        ValueError: the history is malformed or holds no measurement.
    """
    if not isinstance(history, SmoothnessHistory):
        history = SmoothnessHistory.from_state_dict(history)
    stages = history.stages
    if not stages:
        raise ValueError("the smoothness history holds no measurement to plot")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 2.8 * len(stages)), layout="constrained")
    axes = figure.subplots(len(stages), 2, squeeze=False, width_ratios=(3, 2))
    for row, name in zip(axes, stages, strict=True):
        steps = history.steps(name).double()
        profile = history.depth_profile(name)
        depth_index = torch.arange(1, profile.shape[1] + 1, dtype=torch.float64)
        mesh = row[0].pcolormesh(
            _edges(steps).numpy(), _edges(depth_index).numpy(), profile.T.numpy(), shading="flat"
        )
        figure.colorbar(mesh, ax=row[0], label=r"$\|\theta_{k+1}-\theta_k\|$")
        row[0].set_title(f"{name}: step size in depth")
        row[0].set_xlabel("training step")
        row[0].set_ylabel("k")
        row[0].yaxis.set_major_locator(MaxNLocator(integer=True))
        values = history.metric(name, "lipschitz").numpy()
        row[1].plot(steps.numpy(), values, marker="." if len(steps) < 50 else None)
        row[1].set_title("Lipschitz constant in depth")
        row[1].set_xlabel("training step")
        row[1].set_ylabel(r"$L \max_k \|\theta_{k+1}-\theta_k\|$")
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` to a PNG file that appears whole or not at all; returns ``path``."""
    return atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def plot_smoothness(
    history: SmoothnessHistory | Mapping[str, Mapping[str, Any]], path: str | os.PathLike
) -> Path:
    """Draw a smoothness history (:func:`smoothness_figure`) into a PNG file.

    Args:
        history: as for :func:`smoothness_figure`.
        path: the PNG file to write; it appears whole or not at all.

    Returns:
        ``path``.

    Raises:
        ValueError: the history is malformed or holds no measurement.
    """
    return save_figure(smoothness_figure(history), path)


def _edges(centres: Tensor) -> Tensor:
    """Cell edges around increasing cell centres: midpoints, and half a cell beyond the ends."""
    if len(centres) == 1:
        return torch.cat([centres - 0.5, centres + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    first = centres[:1] - (middle[:1] - centres[:1])
    last = centres[-1:] + (centres[-1:] - middle[-1:])
    return torch.cat([first, middle, last])
