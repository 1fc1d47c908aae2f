"""ODE form
========

Converts the residual stages of a LightningModule to ODE form when fitting starts.
"""

from __future__ import annotations

from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.core.odeform import convert_stage, refresh_steps
from resode_lightning.core.stages import find_stages


class ODEForm(Callback):
    r"""Rescale every residual stage of the trained module to ODE form, once, at setup.

    Each stage of ``L`` blocks then computes ``x_{k+1} = P(x_k + (horizon / L) F_k(x_k))`` with the
    last affine layer of each branch multiplied by ``L / horizon``: the same function, trained in
    the parametrisation whose depth limit is a neural ODE. The conversion happens in ``setup``,
    before optimizers are built; stages already in ODE form (a second ``fit``, or a module
    restored from an ODE-form checkpoint) are left alone. The marker buffers the conversion adds
    travel in the module's state dict, so Lightning checkpoints carry the form. At the start of
    every fit, validation, test and predict run the form is checked again: layers replaced by
    the strategy since setup (``sync_batchnorm=True``) get their step back.

    Args:
        horizon: time interval each stage integrates over (positive).

    Raises:
        ValueError: if ``horizon`` is not positive, or (at setup) if the module holds no
            residual stage.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from resode_lightning import ODEForm
        >>> trainer = Trainer(callbacks=[ODEForm(horizon=1.0)])
    """

    def __init__(self, horizon: float = 1.0) -> None:
        if (
            isinstance(horizon, bool)
            or not isinstance(horizon, (int, float))
            or not 0 < horizon < float("inf")
        ):
            raise ValueError(
                f"ODEForm(horizon=...) must be a positive finite number, got {horizon!r}"
            )
        self.horizon = float(horizon)

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._convert(pl_module)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        # The strategy may have replaced norm layers since setup (sync_batchnorm), dropping
        # the step hooks, and a restored plain checkpoint may have undone the form.
        self._convert(pl_module)

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        self._convert(pl_module)

    @override
    def on_test_start(self, trainer, pl_module) -> None:
        self._convert(pl_module)

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        self._convert(pl_module)

    def _convert(self, pl_module) -> None:
        for residual_stage in find_stages(pl_module):
            convert_stage(residual_stage, self.horizon)
        refresh_steps(pl_module)
