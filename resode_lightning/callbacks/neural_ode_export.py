"""Neural ODE export
=================

Exports the trained ResNet as a neural ODE file when fitting ends.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.export.build import check_export_options, export_neural_ode
from resode_lightning.export.io import save_neural_ode
from resode_lightning.export.source import source_spec


class NeuralODEExport(Callback):
    r"""At the end of ``fit``, export the module's ResNet as a neural ODE and save it.

    The file (written atomically by :func:`save_neural_ode`, rank zero only) loads back with
    ``resode_lightning.load_neural_ode(path)``, without unpickling anything.

    Args:
        path: output file; its directory is created if needed.
        submodule: dotted name of the ResNet inside the LightningModule (e.g. ``"backbone"``);
            by default the first torchvision ResNet or ``ode_resnet`` found in it.
        method: torchdiffeq method of the export (``"euler"``, ``"rk4"``, ``"dopri5"``, ...).
        steps: fixed-grid steps (see :func:`export_neural_ode`).
        interpolation: ``"linear"`` or ``"constant"`` weight path in ``t``.
        gradient: ``"backprop"``, ``"checkpoint"`` or ``"adjoint"``.
        fold_bn: fold BatchNorm into the convolutions.
        knots: number of knots of a least-squares weight path (``None``: one per block).
        rtol: relative tolerance of adaptive methods.
        atol: absolute tolerance of adaptive methods.

    Raises:
        ValueError: at construction, for an invalid export option; at setup, when no exportable
            ResNet is found in the module.

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
        method: str = "euler",
        steps: int | float | dict[str, int] | None = None,
        interpolation: str = "linear",
        gradient: str = "checkpoint",
        fold_bn: bool = True,
        knots: int | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-6,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"NeuralODEExport(path=...) must be a file path, got {path!r}")
        check_export_options(method, steps, interpolation, gradient, knots, rtol, atol)
        self.path = Path(path)
        self.submodule = submodule
        self.options = {
            "method": method,
            "steps": steps,
            "interpolation": interpolation,
            "gradient": gradient,
            "fold_bn": fold_bn,
            "knots": knots,
            "rtol": rtol,
            "atol": atol,
        }

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._find(pl_module)

    def _find(self, pl_module: nn.Module) -> nn.Module:
        if self.submodule is not None:
            try:
                return pl_module.get_submodule(self.submodule)
            except AttributeError:
                raise ValueError(
                    f"NeuralODEExport: the module has no submodule {self.submodule!r}"
                ) from None
        for module in pl_module.modules():
            if source_spec(module) is not None:
                return module
        raise ValueError(
            f"NeuralODEExport: no torchvision ResNet or ode_resnet found in "
            f"{type(pl_module).__name__}; "
            f"pass submodule='name' of the network to export"
        )

    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        exported = export_neural_ode(self._find(pl_module), **self.options)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_neural_ode(exported, self.path)
