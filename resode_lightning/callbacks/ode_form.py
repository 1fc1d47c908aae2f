"""ODE form
========

Keeps the residual stages of a LightningModule in ODE form for a whole run: converted at setup,
a plain-form checkpoint converted as it is restored, its optimizer state carried along.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.core.odeform import (
    convert_stage,
    convert_state_dict,
    refresh_steps,
    rescale_optimizer_state,
    rescaled_keys,
)
from resode_lightning.core.stages import find_stages
from resode_lightning.core.step import named_parameters_by_key


class ODEForm(Callback):
    r"""Train, validate, test and predict with every residual stage of the module in ODE form.

    Each stage of ``L`` blocks then computes ``x_{k+1} = P(x_k + (horizon / L) F_k(x_k))`` with the
    last affine layer of each branch multiplied by ``c = L / horizon``: the same function, trained
    in the parametrisation whose depth limit is a neural ODE. The marker buffers the conversion
    adds travel in the module's state dict, so Lightning checkpoints carry the form. The callback
    acts at these points of a run:

    - ``setup``: plain stages are converted, before optimizers are built. Stages already in ODE
      form (a second ``fit``, a module built in ODE form) are left alone.
    - checkpoint restore (``ckpt_path``): the state of a stage saved without ``ODEForm`` (no
      marker) is converted as it loads, computing the saved function. A stage saved in ODE form
      loads as it is, with its own horizon.
    - ``on_fit_start``, ``on_train_start``, ``on_validation_start``, ``on_test_start``,
      ``on_predict_start``: stages a restore left plain (a module's own ``on_load_checkpoint``
      adopting the checkpoint's form) are converted; layers replaced since setup
      (``sync_batchnorm=True``) get their step back.
    - ``on_train_start``: the restored optimizer state of tensors converted after the optimizer
      was built (the two cases above) is rescaled. A tensor multiplied by ``c`` has gradients
      divided by ``c``, so a state entry that is a running statistic of the ``k``-th power of
      the gradient is divided by ``c ** k``: SGD's ``momentum_buffer`` and Adam's ``exp_avg`` by
      ``c``, ``exp_avg_sq`` and ``max_exp_avg_sq`` by ``c ** 2``, step counts kept (SGD, Adam,
      AdamW, NAdam, RAdam). That is the state the optimizer would hold had it seen the same
      gradients in ODE form; L2 weight decay summed into a buffer is rescaled with it. Training
      then follows the ODE parametrisation, not the plain trajectory: the next SGD step of a
      rescaled tensor is ``c`` times smaller on a tensor ``c`` times larger, Adam's is as large
      as before (Adam ignores the gradient's scale).
    - ``teardown``, ``on_exception``: the module refuses a plain-form state again, as a module
      in ODE form does without the callback.

    Args:
        horizon: time interval each stage integrates over (positive).

    Raises:
        ValueError: if ``horizon`` is not positive, or (at setup) if the module holds no
            residual stage, or (at ``on_train_start``) if an optimizer other than those above
            holds state for a tensor converted after it was built; the message says how to
            resume instead.

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
        self._restore_hook: RemovableHandle | None = None
        self._converted: dict[str, float] = {}

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._convert(pl_module)
        self._remove_restore_hook()
        self._converted.clear()
        # register_load_state_dict_pre_hook, the public name, needs torch >= 2.5
        self._restore_hook = pl_module._register_load_state_dict_pre_hook(
            self._convert_loaded_state, with_module=True
        )

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._converted.update(self._convert(pl_module))
        parameters = named_parameters_by_key(pl_module)
        factors = {parameters[n]: c for n, c in self._converted.items() if n in parameters}
        self._converted.clear()
        for optimizer in trainer.optimizers:
            try:
                rescale_optimizer_state(optimizer, factors)
            except ValueError as error:
                raise ValueError(
                    f"ODEForm converted tensors whose optimizer state was restored in plain "
                    f"form, but {error}. Resume without the optimizer state: load the "
                    f"checkpoint's weights into the module (e.g. "
                    f"`{type(pl_module).__name__}.load_from_checkpoint(path)`) and call `fit` "
                    f"without `ckpt_path`; or convert the weights to ODE form first "
                    f"(`resode convert`, `to_ode_form`) and restart the optimizer."
                ) from error

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def on_test_start(self, trainer, pl_module) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove_restore_hook()
        self._converted.clear()

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._remove_restore_hook()
        self._converted.clear()

    def _convert(self, pl_module: nn.Module) -> dict[str, float]:
        """Convert the plain stages; return the tensors rescaled, by name, with their factor."""
        converted: dict[str, float] = {}
        for residual_stage in find_stages(pl_module):
            if not residual_stage.is_ode_form:
                convert_stage(residual_stage, self.horizon)
                converted.update(rescaled_keys(pl_module, residual_stage))
        refresh_steps(pl_module)
        return converted

    def _convert_loaded_state(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
    ) -> None:
        self._converted.update(convert_state_dict(module, state_dict, prefix=prefix))

    def _remove_restore_hook(self) -> None:
        if self._restore_hook is not None:
            self._restore_hook.remove()
            self._restore_hook = None
