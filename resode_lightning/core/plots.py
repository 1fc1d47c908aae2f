"""Pictures of a smoothness history: depth × training-step heatmaps, Lipschitz curves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from resode_lightning.core.history import SmoothnessHistory
from resode_lightning.core.io.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def smoothness_figure(history: SmoothnessHistory | Mapping[str, Mapping[str, Any]]) -> Figure:
    """A matplotlib figure of a smoothness history, one row of panels per stage.

    Left: heatmap of the slope in depth ``L ||θ_{k+1} - θ_k||`` (all parameters of a block as
    one vector; its maximum over ``k`` is the Lipschitz constant), depth index ``k`` against
    training step; measurements taken while the stage had fewer blocks than its most (it was
    resampled or grown) are stretched over the same depth axis, so depths compare. Right: the
    Lipschitz constant in depth over steps, a dotted line wherever the depth changed.

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
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 2.8 * len(stages)), layout="constrained")
    axes = figure.subplots(len(stages), 2, squeeze=False, width_ratios=(3, 2))
    for row, name in zip(axes, stages, strict=True):
        steps = history.steps(name).double()
        depth = history.depth(name)
        slope = history.depth_profile(name) * depth.unsqueeze(1)
        finite = slope[torch.isfinite(slope)]
        norm = Normalize(*(map(float, finite.aminmax()) if len(finite) else (0.0, 1.0)))
        x, widest = _edges(steps), int(depth.max()) - 1
        start = 0
        for blocks, run in groupby(depth.tolist()):
            stop = start + len(list(run))
            y = 0.5 + widest * torch.linspace(0, 1, blocks, dtype=torch.float64)
            values = slope[start:stop, : blocks - 1].T
            mesh = row[0].pcolormesh(
                x[start : stop + 1].numpy(), y.numpy(), values.numpy(), norm=norm, shading="flat"
            )
            if start:
                row[1].axvline(float(steps[start]), color="grey", linestyle=":", linewidth=1)
            start = stop
        figure.colorbar(mesh, ax=row[0], label=r"$L\,\|\theta_{k+1}-\theta_k\|$")
        row[0].set_title(f"{name}: slope in depth")
        row[0].set_xlabel("training step")
        row[0].set_ylabel("k" if bool((depth == depth[0]).all()) else f"k (of {widest + 1} blocks)")
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
