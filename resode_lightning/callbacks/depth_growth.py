"""Depth growth
============

Trains a ResNet from a fraction of each residual stage's depth and grows the stages by
interpolation in depth until they reach the depth the model was built with (Chang et al.,
"Multi-level residual networks from dynamical systems view", ICLR 2018): the early epochs cost a
fraction of the full network's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from resode_lightning._lightning import Callback, lightning_pytorch
from resode_lightning.callbacks._growth_state import (
    STATE_VERSION,
    check_state,
    is_epoch,
    is_index,
    is_number,
)
from resode_lightning.callbacks._trainer import averaged_copies, first_tensor
from resode_lightning.callbacks.depth_sampling import DepthSampling
from resode_lightning.core.budget import steps_per_stage
from resode_lightning.core.growth import DepthChange, carry_optimizer_state, grow_depth
from resode_lightning.core.metrics import ALL, smoothness_metrics
from resode_lightning.core.optimizer_state import GRADIENT_ORDERS
from resode_lightning.core.parameters import stage_parameters
from resode_lightning.core.paths import INTERPOLATIONS, Interpolation
from resode_lightning.core.stages import Stage, find_stages

PREFIX = "depth_growth"


class DepthGrowth(Callback):
    r"""Train from a fraction of each residual stage's depth, growing the stages by interpolation.

    Build the model at the depth it should end with; the callback does the rest. Each stage of
    ``L`` blocks (a run of residual blocks, found as :func:`~resode_lightning.find_stages` finds
    them: ``ode_resnet``, torchvision and timm ResNets in either form, registered blocks) trains
    at ``max(2, ⌊f · L⌋)`` blocks for each fraction ``f`` of ``depths`` in turn, and ends at
    ``L``. Each change of depth reads the new blocks off the stage's weight path
    (:func:`~resode_lightning.core.growth.grow_depth`): the network keeps the function it
    computed up to the Euler scheme's error at the new step, which is measured on a probe and
    logged. When a stage grows:

    - the optimizers keep their param groups (the same dicts, so learning-rate schedulers go on
      working), the old blocks' parameters replaced by the new ones; momenta and moments are
      interpolated like the weights and rescaled like the gradients
      (:func:`~resode_lightning.core.growth.carry_optimizer_state`; SGD, Adam, AdamW, NAdam,
      RAdam);
    - the averaged model of ``WeightAveraging`` (EMA) or ``StochasticWeightAveraging`` is grown
      with it, from its own weights; an average kept inside the LightningModule grows like any
      other stage of it;
    - under DDP the module is wrapped again, so that the new parameters' gradients are reduced.
      Every rank grows at the same step: the schedule is the same everywhere, the trigger's
      decision and the probe come from rank 0.

    When the run starts (``setup`` of ``fit``) the stages are shrunk to the first fraction, the
    same way, before the optimizers are built. The stages grow at the first training batch of
    the epochs of ``epochs``; with ``trigger``, also earlier: at the first batch of an epoch
    when the Lipschitz constant in depth of every stage still to grow
    (``L · max_k ||θ_{k+1} - θ_k||``, the ``lipschitz`` metric that
    :class:`~resode_lightning.SmoothnessMonitor` logs) changed by less than ``trigger``
    (relative) over the last epoch, both readings taken after an epoch of training at the
    current depths (so each depth trains for two epochs at least): the weight path has settled
    at this resolution. The constant is read from the weights at the start of each epoch, so a
    resumed run takes the same decisions.

    Checkpoints record the current depths and the schedule's progress in the callback's state.
    Resuming (``ckpt_path``) with the callback rebuilds the freshly built model at the
    checkpoint's depths before anything is loaded into it (the module's own
    ``on_load_checkpoint`` included), so the run continues as if never interrupted. A
    checkpoint written after the last growth holds an ordinary network of the built depths: it
    loads without the callback (``load_from_checkpoint``). An earlier one holds the stages at
    the depths of its state's ``depths`` (one per stage, in the order of ``state["stages"]``):
    resize a freshly built model with ``grow_depth`` to load it without a Trainer.

    Args:
        depths: fractions of each stage's depth, increasing, the last ``1.0``: the depths the
            stages train at, in turn.
        epochs: the epoch at which each depth after the first starts (one per growth,
            increasing); an int is an epoch index (at least 1), a float in ``(0, 1)`` a
            fraction of ``max_epochs`` (``int(f · max_epochs)``, at least 1). With ``trigger``,
            the latest epochs.
        trigger: grow as soon as the Lipschitz constant in depth of every stage still to grow
            changes by less than this fraction over an epoch (``None``: the schedule alone).
        interpolation: weight path between blocks: ``"constant"`` (each new block takes the
            weights of the old block whose step it falls in: the field the stage integrates is
            kept, the Lipschitz constant in depth doubles when the depth does) or ``"linear"``
            (the constant is kept, the field is not: on ``benchmarks/growth.py``'s torchvision
            ResNet, growing 3 blocks to 15 linearly cost 16 pt of accuracy, constantly none).
        probe_samples: samples of the growth epoch's first training batch (rank 0's) on which
            the error of each growth is measured.

    Raises:
        ValueError: at construction, for an invalid argument; at setup, for a module without
            residual stages, blocks whose step cannot be changed or that are not numbered
            consecutively, a strategy other than single-device or DDP, a
            :class:`~resode_lightning.callbacks.DepthSampling` callback (it holds the stages as
            they were when fitting started), ``epochs`` not before
            ``max_epochs`` (or fractions without ``max_epochs``); when fitting starts, for an
            optimizer whose state cannot be carried; at restore, for a checkpoint state that is
            not this callback's or was recorded for other stage depths.

    Logged metrics (``STAGE`` a stage name, at each growth):
        ``depth_growth/STAGE/depth``, ``depth_growth/STAGE/error`` (the stage's output on the
        probe, new blocks against old: ``||y' - y|| / ||y||``) and
        ``depth_growth/output_error`` (the same for the module's output). :attr:`growths`
        keeps every growth's record.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from resode_lightning import DepthGrowth
        >>> trainer = Trainer(max_epochs=15, callbacks=[DepthGrowth((0.25, 0.5, 1.0), (5, 10))])
    """

    def __init__(
        self,
        depths: Sequence[float] = (0.25, 0.5, 1.0),
        epochs: Sequence[int | float] = (0.3, 0.6),
        *,
        trigger: float | None = None,
        interpolation: Interpolation = "constant",
        probe_samples: int = 16,
    ) -> None:
        depths, epochs = tuple(depths), tuple(epochs)
        if (
            len(depths) < 2
            or not all(is_number(f) and 0 < f <= 1 for f in depths)
            or any(a >= b for a, b in zip(depths, depths[1:]))
            or depths[-1] != 1
        ):
            raise ValueError(
                f"DepthGrowth(depths=...) must be at least two increasing fractions in (0, 1], "
                f"the last 1.0, got {depths!r}"
            )
        if len(epochs) != len(depths) - 1 or not all(is_epoch(e) for e in epochs):
            raise ValueError(
                f"DepthGrowth(epochs=...) needs one epoch per growth ({len(depths) - 1} for "
                f"depths={depths!r}): ints >= 1 or fractions of max_epochs in (0, 1), got "
                f"{epochs!r}"
            )
        if trigger is not None and not (is_number(trigger) and 0 < trigger < 1):
            raise ValueError(
                f"DepthGrowth(trigger=...) must be a fraction in (0, 1) or None, got {trigger!r}"
            )
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"DepthGrowth(interpolation=...) must be one of {INTERPOLATIONS}, got "
                f"{interpolation!r}"
            )
        if not is_index(probe_samples) or probe_samples < 1:
            raise ValueError(
                f"DepthGrowth(probe_samples=...) must be a positive int, got {probe_samples!r}"
            )
        self.depths = tuple(float(f) for f in depths)
        self.epochs = epochs
        self.trigger = None if trigger is None else float(trigger)
        self.interpolation = interpolation
        self.probe_samples = probe_samples
        self._targets: list[int] = []
        self._names: list[str] = []
        self._epochs: list[int] = []
        self._level = 0
        self._checked_epoch = -1
        self._readings: list[float] | None = None
        self._growths: list[dict[str, Any]] = []

    @property
    def growths(self) -> list[dict[str, Any]]:
        """One record per growth: ``epoch``, ``step``, ``depths`` (``{stage: [old, new]}``),
        ``errors`` (``{stage: error}``) and ``output_error`` (``None`` when not measured)."""
        return [dict(record) for record in self._growths]

    def stage_depths(self, level: int) -> list[int]:
        """The depth of every stage (in :func:`~resode_lightning.find_stages` order) at the
        ``level``-th fraction of ``depths``."""
        fraction = self.depths[level]
        return [
            max(2, steps_per_stage(fraction, {"s": target}, {"s": target})["s"])
            for target in self._targets
        ]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, _STRATEGIES) or isinstance(trainer.strategy, _SHARDED):
            raise ValueError(
                f"DepthGrowth rebuilds the module's stages in each process and works with "
                f"single-device and DDP strategies, not {type(trainer.strategy).__name__}"
            )
        if any(isinstance(callback, DepthSampling) for callback in trainer.callbacks):
            raise ValueError(
                "DepthGrowth changes the stages' depth while training; DepthSampling holds the "
                "stages as they were when fitting started: use one of them per fit (grow "
                "first, then fine-tune with DepthSampling in a second fit)"
            )
        stages = _stages(pl_module)
        self._targets, self._names = [s.depth for s in stages], [s.name for s in stages]
        _hook_restore(self, trainer, pl_module)
        if stage != "fit":
            return
        self._epochs = self._resolve_epochs(trainer.max_epochs, check=not trainer.fast_dev_run)
        self._level, self._checked_epoch, self._readings, self._growths = 0, -1, None, []
        _resize(pl_module, self.stage_depths(0), self.interpolation)
        self._names = [s.name for s in _stages(pl_module)]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            if type(optimizer) not in GRADIENT_ORDERS:
                raise ValueError(
                    f"DepthGrowth carries the state of "
                    f"{', '.join(cls.__name__ for cls in GRADIENT_ORDERS)} across a growth, not "
                    f"of {type(optimizer).__name__}"
                )
        depths = [s.depth for s in _stages(pl_module)]
        for module in averaged_copies(trainer):
            _resize(module, depths, self.interpolation)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        if epoch == self._checked_epoch:
            return
        self._checked_epoch = epoch
        level = max(self._level, sum(e <= epoch for e in self._epochs))
        readings = None
        if self.trigger is not None:
            # a reading counts once the current depths have trained for an epoch
            if epoch > 0 and self._level < len(self.depths) - 1:
                readings = _lipschitz(pl_module)
                if level == self._level and self._settled(readings):
                    level += 1
            level = trainer.strategy.broadcast(level, src=0)
        if level > self._level:
            self._grow(trainer, pl_module, batch, level)
            readings = None
        self._readings = readings

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _unhook_restore(pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        _unhook_restore(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "stages": list(self._names),
            "targets": list(self._targets),
            "depths": self.stage_depths(self._level),
            "level": self._level,
            "checked_epoch": self._checked_epoch,
            "readings": self._readings,
            "growths": self.growths,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = check_state(state_dict, **self._settings())
        self._level = state["level"]
        self._checked_epoch = state["checked_epoch"]
        self._readings = state["readings"]
        self._growths = state["growths"]

    def _settings(self) -> dict[str, Any]:
        return {
            "fractions": self.depths,
            "targets": self._targets,
            "stage_depths": self.stage_depths,
        }

    def _adopt(
        self, pl_module: nn.Module, checkpoint: dict[str, Any], averaged: list[nn.Module]
    ) -> None:
        """Rebuild ``pl_module`` (and ``averaged``) at the depths ``checkpoint`` holds."""
        callbacks = checkpoint.get("callbacks")
        state = callbacks.get(self.state_key) if isinstance(callbacks, dict) else None
        if state is None:  # written without this callback: the depths the module was built at
            depths = list(self._targets)
            self._level = len(self.depths) - 1
        else:
            depths = check_state(state, **self._settings())["depths"]
        for module in (pl_module, *averaged):
            _resize(module, depths, self.interpolation)
        self._names = [s.name for s in _stages(pl_module)]

    def _grow(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, level: int
    ) -> None:
        probe = first_tensor(batch)
        if probe is not None:
            probe = probe[: self.probe_samples].detach().to("cpu", copy=True)
            probe = trainer.strategy.broadcast(probe, src=0).to(pl_module.device)
        depths = self.stage_depths(level)
        change = _resize(pl_module, depths, self.interpolation, probe)
        self._names = [s.name for s in _stages(pl_module)]
        for optimizer in trainer.optimizers:
            carry_optimizer_state(optimizer, change)
        for module in averaged_copies(trainer):
            _resize(module, depths, self.interpolation)
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        self._level = level
        # the ranks' BatchNorm statistics differ until DDP broadcasts rank 0's: its errors count
        errors, output_error = strategy.broadcast((change.errors, change.output_error), src=0)
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "depths": {name: list(pair) for name, pair in change.depths.items()},
            "errors": dict(errors),
            "output_error": output_error,
        }
        self._growths.append(record)
        for name, (_, depth) in change.depths.items():
            pl_module.log(f"{PREFIX}/{name}/depth", float(depth), on_step=True, on_epoch=False)
        for name, error in errors.items():
            pl_module.log(f"{PREFIX}/{name}/error", error, on_step=True, on_epoch=False)
        if output_error is not None:
            pl_module.log(f"{PREFIX}/output_error", output_error, on_step=True, on_epoch=False)
        grown = ", ".join(f"{name} {a} -> {b}" for name, (a, b) in change.depths.items())
        measured = ", ".join(f"{name} {e:.3g}" for name, e in errors.items())
        rank_zero_info(
            f"DepthGrowth: epoch {trainer.current_epoch}: {grown} blocks"
            + (f"; error on the probe: {measured}" if measured else "")
        )

    def _settled(self, readings: list[float]) -> bool:
        """Whether the Lipschitz constant of every stage still to grow moved less than
        ``trigger`` since the last epoch (at this depth)."""
        if self._readings is None or len(self._readings) != len(readings):
            return False
        growing = [
            i
            for i, (now, last) in enumerate(zip(self.stage_depths(self._level), self._targets))
            if now < last
        ]
        return all(
            abs(readings[i] - self._readings[i])
            <= self.trigger * max(abs(readings[i]), abs(self._readings[i]))
            for i in growing
        )

    def _resolve_epochs(self, max_epochs: int | None, *, check: bool = True) -> list[int]:
        """``epochs`` as epoch indices; unless ``check`` (``fast_dev_run``), refused when they
        do not increase or do not come before ``max_epochs``."""
        known = max_epochs is not None and max_epochs >= 0
        if not known and any(isinstance(e, float) for e in self.epochs):
            raise ValueError(
                f"DepthGrowth(epochs={self.epochs!r}) gives fractions of max_epochs, but the "
                f"Trainer has none: give epoch indices, or set Trainer(max_epochs=...)"
            )
        epochs = [max(1, int(e * max_epochs)) if isinstance(e, float) else e for e in self.epochs]
        if not check:
            return epochs
        if any(a >= b for a, b in zip(epochs, epochs[1:])):
            raise ValueError(
                f"DepthGrowth(epochs={self.epochs!r}) gives the growth epochs {epochs} with "
                f"max_epochs={max_epochs}: they must increase; spread them further apart"
            )
        if known and epochs[-1] >= max_epochs:
            raise ValueError(
                f"DepthGrowth grows the stages to their full depth at epoch {epochs[-1]}, not "
                f"before max_epochs={max_epochs}: the model would end shallower than it was "
                f"built; give earlier epochs"
            )
        return epochs


_STRATEGIES: tuple[type, ...] = (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy)
_SHARDED: tuple[type, ...] = (pl.strategies.DeepSpeedStrategy,)
if lightning_pytorch is not None:
    _STRATEGIES += (
        lightning_pytorch.strategies.SingleDeviceStrategy,
        lightning_pytorch.strategies.DDPStrategy,
    )
    _SHARDED += (lightning_pytorch.strategies.DeepSpeedStrategy,)


def _stages(module: nn.Module) -> list[Stage]:
    try:
        return find_stages(module)
    except ValueError as error:
        raise ValueError(f"DepthGrowth: {error}") from None


def _resize(
    module: nn.Module, depths: list[int], interpolation: Interpolation, probe: Tensor | None = None
) -> DepthChange:
    """Rebuild ``module``'s stages at ``depths`` (one per stage, in order)."""
    stages = _stages(module)
    if len(depths) != len(stages):
        raise ValueError(
            f"DepthGrowth: {type(module).__name__} has {len(stages)} residual stages, "
            f"{[s.name for s in stages]}, but {len(depths)} depths were recorded for it"
        )
    named = {stage.name: depth for stage, depth in zip(stages, depths)}
    return grow_depth(module, named, interpolation=interpolation, probe=probe)


def _lipschitz(module: nn.Module) -> list[float]:
    """The Lipschitz constant in depth of every stage (the monitor's ``lipschitz``)."""
    values = [smoothness_metrics(stage_parameters(s))[ALL]["lipschitz"] for s in _stages(module)]
    return torch.stack(values).tolist()


def _hook_restore(callback: DepthGrowth, trainer: pl.Trainer, pl_module: nn.Module) -> None:
    """Rebuild the module at a checkpoint's depths before the Trainer restores it: the module's
    ``on_load_checkpoint`` (the first thing the Trainer calls with the checkpoint, before the
    state dict is loaded) is wrapped, as an instance attribute, until teardown."""
    current = pl_module.__dict__.get("on_load_checkpoint")
    if getattr(current, "depth_growth", None) is callback:
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
        callback._adopt(pl_module, checkpoint, averaged_copies(trainer))
        return original(checkpoint)

    on_load_checkpoint.depth_growth = callback  # type: ignore[attr-defined]
    pl_module.on_load_checkpoint = on_load_checkpoint


def _unhook_restore(pl_module: nn.Module) -> None:
    if hasattr(pl_module.__dict__.get("on_load_checkpoint"), "depth_growth"):
        del pl_module.on_load_checkpoint
