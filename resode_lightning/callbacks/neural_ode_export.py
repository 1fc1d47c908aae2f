"""Neural ODE export
=================

Exports the trained ResNet as a neural ODE file when fitting ends.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.types import STEP_OUTPUT
from torch import nn
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.core.blocks import BlockAdapterError
from resode_lightning.core.io.atomic import writable_target
from resode_lightning.core.stages import find_stages
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.options import ExportOptions
from resode_lightning.export.serialization import save_neural_ode


class NeuralODEExport(Callback):
    r"""At the end of ``fit``, export the module's ResNet as a neural ODE and save it.

    Everything that could refuse the export is checked when fitting starts (``setup``), by
    exporting the network once: an unknown submodule, a network without residual stages,
    options that do not fit it, an output path that cannot be written. A run whose weights
    went NaN or infinite writes nothing (an existing file is kept) and warns with the first
    step where they did. The file (written atomically by :func:`save_neural_ode`, rank zero
    only, after checking that it loads back) loads back without unpickling
    anything, with ``resode_lightning.load_neural_ode(path)`` for a torchvision ResNet or an
    ``ode_resnet``, and with ``load_neural_ode(path, model=<a fresh network>)`` for any other.

    Args:
        path: output file; its directory is created at setup if needed.
        submodule: dotted name of the network inside the LightningModule (e.g. ``"backbone"``);
            by default the outermost submodule with a ``forward`` of its own that holds
            residual stages (the first one, in registration order).
        options: the export's :class:`~resode_lightning.export.options.ExportOptions`.
        overrides: option names and values replacing those of ``options``
            (``NeuralODEExport(path, method="rk4")``).

    Attributes:
        network_name: dotted name of the network exported, found at setup.

    Raises:
        ValueError: at construction, for an invalid export option; at setup of ``fit``, when
            the network is not found or cannot be exported with these options, or ``path``
            cannot be written (a directory, a special file, a folder that is read-only or
            cannot be created).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from resode_lightning import NeuralODEExport
        >>> trainer = Trainer(callbacks=[NeuralODEExport("exports/model_ode.pt", method="rk4")])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        submodule: str | None = None,
        options: ExportOptions | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"NeuralODEExport(path=...) must be a file path, got {path!r}")
        self.path = Path(path)
        self.submodule = submodule
        self.options = (options or ExportOptions()).replace(**overrides)
        self.network_name: str | None = None
        self._floating_parameters: list[torch.Tensor] = []
        self._first_non_finite: torch.Tensor | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.network_name = self._find(pl_module)
        network = pl_module.get_submodule(self.network_name)
        try:
            export_neural_ode(network, self.options)
        except ValueError as error:
            raise ValueError(
                f"NeuralODEExport: cannot export submodule {self.network_name!r} "
                f"({type(network).__name__}): {error}"
            ) from None
        if self.path.is_dir():
            raise ValueError(f"NeuralODEExport: path {str(self.path)!r} is a directory")
        if trainer.is_global_zero:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(
                    f"NeuralODEExport: cannot write {str(self.path)!r}: creating its folder "
                    f"failed ({error})"
                ) from None
            try:
                writable_target(self.path)
            except (OSError, ValueError) as error:  # its messages name the path
                raise ValueError(f"NeuralODEExport: {error}") from None
        self._floating_parameters = [p for p in network.parameters() if p.is_floating_point()]
        self._first_non_finite = None

    def _find(self, pl_module: nn.Module) -> str:
        """The dotted name of the network to export."""
        if self.submodule is not None:
            try:
                pl_module.get_submodule(self.submodule)
            except AttributeError:
                raise ValueError(
                    f"NeuralODEExport: the module has no submodule {self.submodule!r}"
                ) from None
            return self.submodule
        for name, module in pl_module.named_modules():
            if not name or type(module).forward is nn.Module.forward:
                continue  # the LightningModule itself, or a container without forward
            try:
                find_stages(module)
            except BlockAdapterError:
                raise
            except ValueError:
                continue
            return name
        raise ValueError(
            f"NeuralODEExport: no submodule of {type(pl_module).__name__} holds residual "
            f"stages; pass submodule='name' of the network to export, and register its block "
            f"type with resode_lightning.register_block"
        )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # the first step whose weights are not finite, kept on the device: no host sync here
        if not self._floating_parameters:
            return
        largest = torch.nn.utils.get_total_norm(self._floating_parameters, norm_type=math.inf)
        step = torch.full((), trainer.global_step, device=largest.device)
        if self._first_non_finite is None:
            self._first_non_finite = torch.full((), -1, device=largest.device)
        fresh = ~torch.isfinite(largest) & (self._first_non_finite < 0)
        self._first_non_finite = torch.where(fresh, step, self._first_non_finite)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        network = pl_module.get_submodule(self.network_name)
        broken = [n for n, p in network.named_parameters() if not bool(p.isfinite().all())]
        if broken:
            first = -1 if self._first_non_finite is None else int(self._first_non_finite)
            when = f" (first after global step {first})" if first >= 0 else ""
            rank_zero_warn(
                f"NeuralODEExport: not writing {str(self.path)!r}: the weights of "
                f"{self.network_name!r} went NaN or infinite{when}, e.g. {broken[0]}; "
                f"an existing file was kept. Lower the learning rate or check the data"
            )
            return
        save_neural_ode(export_neural_ode(network, self.options), self.path, model=network)
