"""ODE form
========

Keeps the residual stages of a LightningModule in ODE form for a whole run: converted at setup,
a plain-form checkpoint converted as it is restored, its optimizer state carried along. The
checkpoints it writes hold the plain weights of the stages it converted, so that the user's own
``LightningModule.load_from_checkpoint`` loads them strictly into the plain model; the form
travels in the callback's state and is re-applied when a run resumes with the callback.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.core.odeform import (
    convert_stage,
    convert_state_dict,
    gains,
    refresh_steps,
    unconvert_state_dict,
)
from resode_lightning.core.optimizer_state import rescale_optimizer_state
from resode_lightning.core.stages import find_stages
from resode_lightning.core.step import named_parameters_by_key


class ODEForm(Callback):
    r"""Train, validate, test and predict with every residual stage of the module in ODE form.

    Each stage of ``L`` blocks then computes ``x_{k+1} = P(x_k + (horizon / L) F_k(x_k))`` with the
    last affine layer of each branch multiplied by ``c = L / horizon``: the same function, trained
    in the parametrisation whose depth limit is a neural ODE. The callback acts at these points
    of a run:

    - ``setup``: plain stages are converted, before optimizers are built. Stages already in ODE
      form (a second ``fit``, a module built in ODE form) are left alone.
    - ``on_save_checkpoint``: the stages this callback converted (plain when the run, or the
      first run on the module, began) are saved in the plain form: weights times
      ``horizon / L``, no marker buffer, so the checkpoint loads strictly into the module the
      user's constructor builds (``MyModule.load_from_checkpoint(path)``) and computes the same
      function, with ``strict=False`` too. Their horizons (by marker key) go to the callback's
      state, with the exact ODE-form values of any tensor the rescale does not round-trip
      bit for bit; the optimizer state is saved as it is, in the ODE parametrisation. Stages
      that were in ODE form before (a module built in ODE form) keep their markers.
      ``Trainer.save_checkpoint(weights_only=True)`` and ``ModelCheckpoint(save_weights_only=
      True)`` call no callback: their files keep the ODE form and markers (a warning at setup).
    - checkpoint restore (``ckpt_path``): the state of a stage saved without ``ODEForm`` (no
      marker) is converted as it loads, computing the saved function. A stage saved in ODE form
      loads as it is, with its own horizon. A stage this callback saved plain is put back in
      the ODE form with its recorded horizon and exact values, its optimizer state kept (it is
      already in the ODE parametrisation): the run continues as if never interrupted.
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
            resume instead; or (at restore) if the checkpoint's ``ODEForm`` state is of a later
            version or damaged.

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
        self._loaded_plain: dict[str, Tensor] = {}
        self._module: nn.Module | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._convert(pl_module)
        self._remove_restore_hook()
        self._converted.clear()
        self._loaded_plain.clear()
        self._module = pl_module
        # register_load_state_dict_pre_hook, the public name, needs torch >= 2.5
        self._restore_hook = pl_module._register_load_state_dict_pre_hook(
            self._convert_loaded_state, with_module=True
        )
        if _marked(pl_module) and any(
            getattr(callback, "save_weights_only", False)
            for callback in getattr(trainer, "checkpoint_callbacks", [])
        ):
            warnings.warn(
                "ODEForm: a checkpoint callback has save_weights_only=True; Lightning calls no "
                "callback for such files, so they hold the ODE-form weights and markers: load "
                "them with resode_lightning.load_into (or resume with ODEForm), not with a "
                "plain model's load_from_checkpoint",
                UserWarning,
                stacklevel=2,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._converted.update(self._convert(pl_module))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._end()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._end()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("state_dict")
        markers = _marked(pl_module)
        if not isinstance(state, dict) or not markers:
            return
        saved = dict(state)
        factors = unconvert_state_dict(pl_module, state, markers=markers)
        if not factors:
            return
        prefixes = {id(m): f"{name}." if name else "" for name, m in pl_module.named_modules()}
        horizons = {
            f"{prefixes[id(s.container)]}{s.marker}": float(s.horizon)
            for s in find_stages(pl_module)
            if f"{prefixes[id(s.container)]}{s.marker}" in saved
            and f"{prefixes[id(s.container)]}{s.marker}" not in state
        }
        exact = {  # the ODE-form values the plain ones do not give back exactly
            key: saved[key].detach().clone()
            for key, factor in factors.items()
            if not torch.equal(state[key] * factor, saved[key])
        }
        callbacks = checkpoint.setdefault("callbacks", {})
        callbacks[self.state_key] = {"version": STATE_VERSION, "horizons": horizons, "exact": exact}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version") if isinstance(state_dict, dict) else None
        horizons = state_dict.get("horizons") if isinstance(state_dict, dict) else None
        if version != STATE_VERSION or not isinstance(horizons, dict):
            raise ValueError(
                f"the checkpoint's ODEForm state is not one this version reads (version "
                f"{version!r}, this one reads {STATE_VERSION}); resume with the resode_lightning "
                f"version that wrote it, or load the weights alone (load_from_checkpoint) and "
                f"fit without ckpt_path"
            )
        if self._module is not None:
            self._restore_form(self._module, horizons, state_dict.get("exact") or {})
        self._loaded_plain.clear()

    def _restore_form(
        self, module: nn.Module, horizons: dict[str, Any], exact: dict[str, Tensor]
    ) -> None:
        """Put the stages the checkpoint holds plain (``horizons``) back in ODE form, in place."""
        prefixes = {id(m): f"{name}." if name else "" for name, m in module.named_modules()}
        tensors = module.state_dict(keep_vars=True)
        for stage in find_stages(module):
            key = f"{prefixes[id(stage.container)]}{stage.marker}"
            if key not in horizons:
                continue
            horizon = horizons[key]
            if isinstance(horizon, bool) or not isinstance(horizon, (int, float)):
                horizon = float("nan")
            if not 0 < horizon < math.inf:
                raise ValueError(
                    f"the checkpoint's ODEForm state records horizon {horizon!r} "
                    f"for {key!r}; a horizon is a finite positive number"
                )
            if stage.is_ode_form:
                plain = self._loaded_plain  # the restore hook converted them as they loaded
                if any(k not in plain for k in gains(module, stage)):
                    continue  # not loaded plain: left as loaded
                stage.container._buffers[stage.marker].fill_(float(horizon))
            else:  # the module adopted the plain form as it loaded
                convert_stage(stage, float(horizon), rescale=False)
                plain = {k: tensors[k].detach().clone() for k in gains(module, stage)}
            _mark(stage)
            refresh_steps(module)
            step = stage.step
            with torch.no_grad():
                for name, factor in gains(module, stage).items():
                    value = exact.get(name)
                    if not (
                        isinstance(value, Tensor)
                        and value.shape == plain[name].shape
                        and torch.equal(value.to(plain[name]) * step, plain[name])
                    ):
                        value = plain[name] * factor
                    tensors[name].copy_(value)
                    # its optimizer state was saved in the ODE parametrisation already
                    self._converted.pop(name, None)
        refresh_steps(module)

    def _end(self) -> None:
        self._remove_restore_hook()
        self._converted.clear()
        self._loaded_plain.clear()
        self._module = None

    def _convert(self, pl_module: nn.Module) -> dict[str, float]:
        """Convert the plain stages; return the tensors rescaled, by name, with their factor."""
        converted: dict[str, float] = {}
        for residual_stage in find_stages(pl_module):
            if not residual_stage.is_ode_form:
                convert_stage(residual_stage, self.horizon)
                _mark(residual_stage)
                converted.update(gains(pl_module, residual_stage))
        refresh_steps(pl_module)
        return converted

    def _convert_loaded_state(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
    ) -> None:
        saved = dict(state_dict)
        converted = convert_state_dict(module, state_dict, prefix=prefix)
        self._loaded_plain.update({name: saved[f"{prefix}{name}"] for name in converted})
        self._converted.update(converted)

    def _remove_restore_hook(self) -> None:
        if self._restore_hook is not None:
            self._restore_hook.remove()
            self._restore_hook = None


STATE_VERSION = 1
"""Version of the state :class:`ODEForm` records in the checkpoints it writes."""

_MARKED = "_resode_odeform_converted"
"""Attribute of a stage container: the markers of its stages ``ODEForm`` converted from the
plain form (those the checkpoints of the run hold plain)."""


def _mark(stage: Any) -> None:
    stage.container.__dict__.setdefault(_MARKED, set()).add(stage.marker)


def _marked(module: nn.Module) -> set[str]:
    """Marker keys (relative to ``module``) of the ODE-form stages ``ODEForm`` converted."""
    return {
        f"{name}.{marker}" if name else marker
        for name, container in module.named_modules()
        for marker in container.__dict__.get(_MARKED, ())
        if marker in container._buffers
    }
