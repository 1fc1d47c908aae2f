"""Smoothness monitor
==================

Tracks, while a model trains, how smoothly the weights of each residual stage vary with
depth (``docs/theory.md``, "Smoothness metrics"), and logs it through the Trainer's
loggers.
"""

from __future__ import annotations

import os
from itertools import zip_longest
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.callbacks._trainer import first_tensor
from resode_lightning.core.history import Measurement, SmoothnessHistory
from resode_lightning.core.metrics import METRICS, depth_consistency, metric_table
from resode_lightning.core.plots import save_figure, smoothness_figure
from resode_lightning.core.watch import WatchedStage, stage_inputs, watch_stages

PREFIX = "smoothness"
PLOT_NAME = "smoothness.png"
STATE_VERSION = 2
"""Version of the checkpoint state: 2 keys metrics by name; version 1 states are converted."""
_FLUSH_EVERY = 1024


class SmoothnessMonitor(Callback):
    r"""Log the smoothness in depth of every residual stage's weights while training.

    The stages of the LightningModule (torchvision ResNets under any attribute, ODE-form
    models, :func:`~resode_lightning.ode_resnet`, registered block types) are found when
    fitting starts, and again whenever the module changes (a block, a layer or a parameter
    replaced, a stage resampled or grown to another depth, a module added or removed), which
    is told from object identities alone. They are measured every
    ``every_n_steps`` optimizer steps, on the parameters' device, in the ODE parametrisation
    (so values are comparable between plain and ODE-form models and across depths), without
    synchronising with the GPU.

    Measurements reach the loggers (rank 0 only) in batches, with the optimizer step they
    were taken at and one host transfer per batch: at every step the Trainer logs
    (``log_every_n_steps``), at epoch ends and at the end of fitting. The per-stage values are
    also passed to ``pl_module.log`` (``logger=False``) as they are measured, so other
    callbacks (``ModelCheckpoint``, ``EarlyStopping``) can monitor them. Every rank computes
    the same values from its identical parameters; the probe batch is broadcast from rank 0,
    the only collective call.

    The history of every measurement (metrics and depth profiles ``||θ_{k+1} - θ_k||``) is
    the callback's state: it is saved in Lightning checkpoints and a resumed run continues
    it. Metrics are saved by name, so a checkpoint written before a metric was added resumes
    (that metric is NaN in its rows); a stage whose depth changes keeps its earlier rows, each
    with the depth it was measured at. At the end of fitting, rank 0 draws it
    (:func:`~resode_lightning.plot_smoothness`) into ``smoothness.png`` in the logger's
    directory (``default_root_dir`` without logger), and logs the figure to the loggers that
    take images (TensorBoard, Weights & Biases, MLflow).

    Logged metrics (``STAGE`` is the stage name, e.g. ``layer3`` or ``model.net.layer3``;
    ``METRIC`` is one of ``weight_norm``, ``lipschitz``, ``total_variation``,
    ``relative_roughness``, ``curvature``; ``PARAM`` a block parameter name such as
    ``conv2.weight``):

    - ``smoothness/STAGE/METRIC``: all of a block's parameters as one vector;
    - ``smoothness/STAGE/PARAM/METRIC``: one parameter name (when ``per_parameter``);
    - ``smoothness/STAGE/depth_consistency``: the probe (when ``probe_every_n_epochs``).

    Args:
        every_n_steps: measure every this many optimizer steps; ``None`` (default) uses the
            Trainer's ``log_every_n_steps``.
        on_epoch_end: also measure at the end of every training epoch.
        per_parameter: log the per-parameter-name metrics too (the history always keeps them).
        probe_every_n_epochs: run the depth-consistency probe every this many epochs, at the
            end of validation, on a fixed batch taken once from rank 0's validation loader
            (``None``: never). The probe calls ``pl_module(x)`` with the first tensor of the
            batch to reach the stages' inputs.
        probe_samples: number of samples of that batch the probe keeps.
        plot: draw the history into ``smoothness.png`` at the end of fitting.

    Raises:
        ValueError: for an invalid argument, when fitting a module that holds no residual
            stage, or when loading a checkpoint state that is not this callback's.

    Non-finite weights do not stop training: their metrics are logged as NaN/inf and one
    warning names the stages and parameters concerned.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from resode_lightning import SmoothnessMonitor
        >>> trainer = Trainer(callbacks=[SmoothnessMonitor()])
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        on_epoch_end: bool = False,
        per_parameter: bool = True,
        probe_every_n_epochs: int | None = None,
        probe_samples: int = 16,
        plot: bool = True,
    ) -> None:
        _check_positive("every_n_steps", every_n_steps, optional=True)
        _check_positive("probe_every_n_epochs", probe_every_n_epochs, optional=True)
        _check_positive("probe_samples", probe_samples)
        for name, value in (
            ("on_epoch_end", on_epoch_end),
            ("per_parameter", per_parameter),
            ("plot", plot),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"SmoothnessMonitor({name}=...) must be a bool, got {value!r}")
        self.every_n_steps = every_n_steps
        self.on_epoch_end = on_epoch_end
        self.per_parameter = per_parameter
        self.probe_every_n_epochs = probe_every_n_epochs
        self.probe_samples = probe_samples
        self.plot = plot
        self._interval = every_n_steps or 0
        self._watched: list[WatchedStage] | None = None
        self._modules: list[nn.Module] = []
        self._last_step = -1
        self._history = SmoothnessHistory()
        self._probe_input: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # the watched stages hold the model's tensors and adapters; they are found again
        return {**self.__dict__, "_watched": None, "_modules": []}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            on_epoch_end=self.on_epoch_end,
            per_parameter=self.per_parameter,
            probe_every_n_epochs=self.probe_every_n_epochs,
        )

    @property
    def history(self) -> dict[str, dict[str, Any]]:
        """Everything measured so far, per stage, on the CPU.

        The format of :meth:`SmoothnessHistory.state_dict
        <resode_lightning.core.history.SmoothnessHistory.state_dict>`.
        """
        return self._history.state_dict()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self._watch(pl_module)
        except ValueError as error:
            raise ValueError(f"SmoothnessMonitor: {error}") from None
        if self.every_n_steps is None:
            self._interval = trainer.log_every_n_steps
        if self.probe_every_n_epochs is not None and not _has_forward(pl_module):
            raise ValueError(
                f"SmoothnessMonitor(probe_every_n_epochs=...) runs the module on a validation "
                f"batch, but {type(pl_module).__name__} defines no forward: define forward(x) "
                f"returning the network's output, or leave probe_every_n_epochs=None"
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
        step = trainer.global_step
        if self._interval and step != self._last_step and step % self._interval == 0:
            self._measure(pl_module, step, on_step=True)
        every = trainer.log_every_n_steps
        if (every and step % every == 0) or self._history.pending >= _FLUSH_EVERY:
            self._flush(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_epoch_end and trainer.global_step != self._last_step:
            self._measure(pl_module, trainer.global_step, on_step=False)
        self._flush(trainer)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        wanted = self.probe_every_n_epochs is not None and self._probe_input is None
        if not wanted or trainer.state.fn != "fit":
            return
        x = first_tensor(batch)
        if x is None:
            raise ValueError(
                "SmoothnessMonitor(probe_every_n_epochs=...) needs a validation batch holding "
                f"a tensor of inputs, got {type(batch).__name__}"
            )
        # once per run: every rank probes rank 0's batch
        x = x[: self.probe_samples].detach().to("cpu", copy=True)
        self._probe_input = trainer.strategy.broadcast(x, src=0)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.probe_every_n_epochs
        if every is None or trainer.sanity_checking or self._probe_input is None:
            return
        if trainer.state.fn != "fit" or (trainer.current_epoch + 1) % every != 0:
            return
        values = self._probe(pl_module)
        for name, value in values.items():
            pl_module.log(f"{PREFIX}/{name}/depth_consistency", value, on_step=False, on_epoch=True)
        self._history.add_probe(trainer.global_step, values)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        if self._last_step == -1 and trainer.global_step > 0 and not trainer.fast_dev_run:
            rank_zero_warn(
                f"SmoothnessMonitor: nothing was measured in {trainer.global_step} steps: "
                f"measurements are taken every {self._interval or 'no'} steps"
                f"{' and at epoch ends' if self.on_epoch_end else ''}; pass "
                f"SmoothnessMonitor(every_n_steps=...) below the run's length"
            )
        if not (self.plot and trainer.is_global_zero and self._history.stages):
            return
        figure = smoothness_figure(self._history)
        directory = Path(_log_dir(trainer))
        directory.mkdir(parents=True, exist_ok=True)
        save_figure(figure, directory / PLOT_NAME)
        for logger in trainer.loggers:
            _log_figure(logger, figure, trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "last_step": self._last_step,
            "history": self._history.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        if keys != ["history", "last_step", "version"]:
            raise ValueError(
                "SmoothnessMonitor: a checkpoint state holds 'history', 'last_step' and "
                f"'version', got {keys!r}"
            )
        version, last_step = state_dict["version"], state_dict["last_step"]
        if type(version) is not int or not 1 <= version <= STATE_VERSION:
            raise ValueError(
                f"SmoothnessMonitor: checkpoint state version {version!r}; this version of "
                f"resode_lightning reads versions 1 to {STATE_VERSION} (a newer one wrote it?)"
            )
        if isinstance(last_step, bool) or not isinstance(last_step, int) or last_step < -1:
            raise ValueError(
                f"SmoothnessMonitor: checkpoint 'last_step' is an int >= -1, got {last_step!r}"
            )
        try:
            self._history = SmoothnessHistory.from_state_dict(state_dict["history"])
        except ValueError as error:
            raise ValueError(f"SmoothnessMonitor: checkpoint state: {error}") from None
        self._last_step = last_step

    def _watch(self, pl_module: nn.Module) -> list[WatchedStage]:
        """Find the stages of ``pl_module`` and remember every module it holds now."""
        self._modules = list(pl_module.modules())
        self._watched = watch_stages(pl_module)
        return self._watched

    def _stages(self, pl_module: nn.Module) -> list[WatchedStage]:
        """The watched stages, found again if the module changed since (no tensor is read)."""
        watched = self._watched
        modules = pl_module.modules()
        unchanged = (
            watched is not None
            and all(a is b for a, b in zip_longest(modules, self._modules))
            and all(stage.is_current() for stage in watched)
        )
        if not unchanged:
            try:
                watched = self._watch(pl_module)
            except ValueError:
                rank_zero_warn("SmoothnessMonitor: the module has no residual stage left")
                watched = self._watched = []
        return watched

    def _measure(self, pl_module: pl.LightningModule, step: int, *, on_step: bool) -> None:
        self._last_step = step
        measurements = []
        with torch.no_grad():
            for watched in self._stages(pl_module):
                name = watched.stage.name
                table, profile = metric_table(watched.tensors, watched.lifts)
                measurements.append(Measurement(name, watched.names, table, profile))
                for column, metric in enumerate(METRICS):
                    pl_module.log(
                        f"{PREFIX}/{name}/{metric}",
                        table[0, column],
                        on_step=on_step,
                        on_epoch=not on_step,
                        logger=False,
                    )
        if measurements:
            self._history.append(step, measurements)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Hand the measurements pending since the last flush to the loggers (one host sync)."""
        drained = self._history.drain()
        report = [
            f"the parameters of stage {name!r} changed; its metric history starts again at "
            f"step {step}"
            for name, step in drained.restarted
        ]
        found: dict[str, list[str]] = {}
        for stage, name, step in drained.non_finite:
            found.setdefault(stage, []).append(f"{name} (from step {step})")
        if found:
            stages = "; ".join(f"stage {name!r}: {', '.join(p)}" for name, p in found.items())
            report.append(f"non-finite weights in {stages}; their metrics are logged as NaN/inf")
        for message in report:
            rank_zero_warn(f"SmoothnessMonitor: {message}")
        if not (trainer.is_global_zero and trainer.loggers and drained.measurements):
            return
        for step, measurements in drained.measurements:
            metrics = {}
            for m in measurements:
                metrics.update(m.scalars(PREFIX, per_parameter=self.per_parameter))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        for logger in trainer.loggers:
            logger.save()

    def _probe(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        stages = [watched.stage for watched in self._stages(pl_module)]
        with torch.inference_mode(False):
            x = self._probe_input.to(pl_module.device, copy=True)
            inputs = stage_inputs(pl_module, stages, x)
            with torch.no_grad():
                return {
                    stage.name: depth_consistency(stage, inputs[stage.name].clone())
                    for stage in stages
                    if stage.name in inputs
                }


def _log_figure(logger: Any, figure: Any, step: int) -> None:
    """Log ``figure`` to a logger that takes images: W&B, TensorBoard, MLflow (else nothing)."""
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(logger, "log_image", None)):
        logger.log_image(key=PREFIX, images=[figure], step=step)
    elif callable(getattr(experiment, "add_figure", None)):
        experiment.add_figure(PREFIX, figure, global_step=step, close=False)
    elif callable(getattr(experiment, "log_figure", None)) and hasattr(logger, "run_id"):
        experiment.log_figure(logger.run_id, figure, PLOT_NAME)


def _check_positive(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"SmoothnessMonitor({name}=...) must be {allowed}, got {value!r}")


def _has_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class (not Lightning's or torch's) defines ``forward``."""
    owner = getattr(type(module).forward, "__module__", "") or ""
    return not owner.startswith(("torch.", "pytorch_lightning.", "lightning."))


def _log_dir(trainer: pl.Trainer) -> str | os.PathLike:
    logger = trainer.logger
    for attribute in ("log_dir", "save_dir"):
        directory = getattr(logger, attribute, None) if logger is not None else None
        if directory:
            return directory
    return trainer.default_root_dir
