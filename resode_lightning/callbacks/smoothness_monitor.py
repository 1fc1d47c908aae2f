"""Smoothness monitor
==================

Tracks, while a model trains, how smoothly the weights of each residual stage vary with
depth (THEORY.md), and logs it through the Trainer's loggers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.core.odeform import stage_tensors
from resode_lightning.core.plots import plot_smoothness
from resode_lightning.core.smoothness import (
    ALL,
    METRICS,
    depth_consistency,
    metric_table,
)
from resode_lightning.core.stages import Stage, find_stages

PREFIX = "smoothness"
PLOT_NAME = "smoothness.png"
_FLUSH_EVERY = 1024


class _StageCache:
    """One stage's live parameter lists and ODE factors, and the layout it was built from."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.tensors, self.scale = stage_tensors(stage)
        self.names = [ALL, *self.tensors]
        self.signature = _signature(stage)
        self.keys = [
            [f"{PREFIX}/{stage.name}/{metric}" for metric in METRICS],
            *[
                [f"{PREFIX}/{stage.name}/{name}/{metric}" for metric in METRICS]
                for name in self.tensors
            ],
        ]


def _signature(stage: Stage) -> tuple:
    """What the cached tensor lists depend on, read without touching device memory."""
    children = tuple(id(child) for child in stage.container.children())
    return id(stage.container), children, id(stage.container._buffers.get(stage.marker))


class SmoothnessMonitor(Callback):
    r"""Log the smoothness in depth of every residual stage's weights while training.

    The stages of the LightningModule (torchvision ResNets under any attribute, ODE-form
    models, :func:`~resode_lightning.ode_resnet`, registered block types) are found once and
    measured every ``every_n_steps`` optimizer steps, on the parameters' device, in the ODE
    parametrisation (so values are comparable between plain and ODE-form models and across
    depths). Values go to ``pl_module.log`` as device tensors: the hook itself does not
    synchronise with the GPU. Every rank computes the same values from its identical
    parameters and no collective call is made, so DDP neither hangs nor logs twice (loggers
    write on rank 0 only).

    The history of every measurement (metrics and depth profiles ``||θ_{k+1} - θ_k||``) is
    the callback's state: it is saved in Lightning checkpoints and a resumed run continues
    it. At the end of fitting, rank 0 draws it (:func:`~resode_lightning.plot_smoothness`)
    into ``smoothness.png`` in the logger's directory (``default_root_dir`` without logger).

    Logged metrics (``STAGE`` is the stage name, e.g. ``layer3`` or ``model.net.layer3``;
    ``METRIC`` is one of ``weight_norm``, ``lipschitz``, ``total_variation``,
    ``relative_roughness``, ``curvature``; ``PARAM`` a block parameter name such as
    ``conv2.weight``):

    - ``smoothness/STAGE/METRIC``: all of a block's parameters as one vector;
    - ``smoothness/STAGE/PARAM/METRIC``: one parameter name (when ``per_parameter``);
    - ``smoothness/STAGE/depth_consistency``: the probe (when ``probe_every_n_epochs``).

    Args:
        every_n_steps: measure every this many optimizer steps; ``None`` (default) uses the
            Trainer's ``log_every_n_steps``, so each measurement reaches the loggers.
        on_epoch_end: also measure at the end of every training epoch.
        per_parameter: log the per-parameter-name metrics too (the history always keeps them).
        probe_every_n_epochs: run the depth-consistency probe every this many epochs, at the
            end of validation, on a fixed batch taken once from the validation loader
            (``None``: never). The probe calls ``pl_module(x)`` with the first tensor of the
            batch to reach the stages' inputs.
        probe_samples: number of samples of that batch the probe keeps.
        plot: draw the history into ``smoothness.png`` at the end of fitting.

    Raises:
        ValueError: for an invalid argument, or (at setup) when the module holds no residual
            stage.

    Non-finite weights do not stop training: their metrics are logged as NaN/inf and one
    warning names the stages and parameters concerned (checked when the history is moved to
    host memory: at epoch ends, at checkpoints, and every 1024 measurements).

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
        self._caches: list[_StageCache] | None = None
        self._last_step = -1
        self._pending: list[tuple[int, list[tuple[str, list[str], Tensor, Tensor]]]] = []
        self._history: dict[str, dict[str, Any]] = {}
        self._probe_input: Tensor | None = None
        self._warned: set[tuple[str, str]] = set()

    def __getstate__(self) -> dict[str, Any]:
        # the stage cache holds the model's tensors and adapters; it is rebuilt on demand
        return {**self.__dict__, "_caches": None}

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

        ``{stage: {"step": int64 (n,), "parameters": [ALL, names…], "metrics": float32
        (n, len(parameters), len(METRICS)), "depth_profile": float32 (n, L-1),
        "probe_step": int64 (m,), "depth_consistency": float32 (m,)}}``; a depth profile
        shorter than the longest (the stage was resampled) is padded with NaN.
        """
        self._flush()
        return self._history

    # ----------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        try:
            self._caches = [_StageCache(s) for s in find_stages(pl_module)]
        except ValueError as error:
            raise ValueError(f"SmoothnessMonitor: {error}") from None
        if self.every_n_steps is None:
            self._interval = trainer.log_every_n_steps

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._interval and step != self._last_step and step % self._interval == 0:
            self._measure(pl_module, step, on_step=True)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.on_epoch_end and trainer.global_step != self._last_step:
            self._measure(pl_module, trainer.global_step, on_step=False)
        self._flush()

    @override
    def on_validation_batch_start(
        self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.probe_every_n_epochs is not None and self._probe_input is None:
            x = _first_tensor(batch)
            if x is None:
                raise ValueError(
                    "SmoothnessMonitor(probe_every_n_epochs=...) needs a validation batch holding "
                    f"a tensor of inputs, got {type(batch).__name__}"
                )
            self._probe_input = x[: self.probe_samples].detach().clone()

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        every = self.probe_every_n_epochs
        if every is None or trainer.sanity_checking or self._probe_input is None:
            return
        if (trainer.current_epoch + 1) % every != 0:
            return
        values = self._probe(pl_module)
        for name, value in values.items():
            pl_module.log(f"{PREFIX}/{name}/depth_consistency", value, on_step=False, on_epoch=True)
        for name, value in values.items():
            record = self._history.setdefault(name, _empty_record())
            keep = record["probe_step"] < trainer.global_step
            record["probe_step"] = torch.cat(
                [record["probe_step"][keep], torch.tensor([trainer.global_step])]
            )
            record["depth_consistency"] = torch.cat(
                [record["depth_consistency"][keep], value.detach().float().cpu().reshape(1)]
            )

    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        self._flush()
        if not (self.plot and trainer.is_global_zero and self._history):
            return
        if not any(len(record["step"]) for record in self._history.values()):
            return
        directory = Path(_log_dir(trainer))
        directory.mkdir(parents=True, exist_ok=True)
        plot_smoothness(self._history, directory / PLOT_NAME)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"version": 1, "last_step": self._last_step, "history": self._history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = []
        self._history = state_dict["history"]
        self._last_step = state_dict["last_step"]

    # -------------------------------------------------------------------------- internals

    def _stages(self, pl_module) -> list[_StageCache]:
        caches = self._caches
        if caches is None or any(_signature(c.stage) != c.signature for c in caches):
            caches = self._caches = [_StageCache(s) for s in find_stages(pl_module)]
        return caches

    def _measure(self, pl_module, step: int, *, on_step: bool) -> None:
        self._last_step = step
        record = []
        with torch.no_grad():
            for cache in self._stages(pl_module):
                table, profile = metric_table(cache.tensors, cache.scale)
                record.append((cache.stage.name, cache.names, table, profile))
                rows = len(cache.names) if self.per_parameter else 1
                for row in range(rows):
                    for column, key in enumerate(cache.keys[row]):
                        pl_module.log(
                            key, table[row, column], on_step=on_step, on_epoch=not on_step
                        )
        self._pending.append((step, record))
        if len(self._pending) >= _FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Move pending device measurements to the CPU history (one host sync)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_stage: dict[str, list[tuple[int, list[str], Tensor, Tensor]]] = {}
        for step, record in pending:
            for name, names, table, profile in record:
                by_stage.setdefault(name, []).append((step, names, table, profile))
        report = []
        for name, entries in by_stage.items():
            tables = torch.stack([table for _, _, table, _ in entries]).float().cpu()
            width = max(len(profile) for *_, profile in entries)
            profiles = torch.stack([_pad(profile, width) for *_, profile in entries]).float().cpu()
            steps = torch.tensor([step for step, *_ in entries], dtype=torch.int64)
            found = self._append(name, entries[-1][1], steps, tables, profiles)
            if found:
                report.append(f"stage {name!r}: {', '.join(found)}")
        if report:
            rank_zero_warn(
                f"SmoothnessMonitor: non-finite weights in {'; '.join(report)}; "
                f"their metrics are logged as NaN/inf"
            )

    def _append(
        self, name: str, names: list[str], steps: Tensor, tables: Tensor, profiles: Tensor
    ) -> list[str]:
        record = self._history.get(name)
        if record is None or record["parameters"] != names:
            if record is not None and len(record["step"]):
                rank_zero_warn(
                    f"SmoothnessMonitor: the parameters of stage {name!r} changed; its metric "
                    f"history starts again at step {int(steps[0])}"
                )
            probes = record or _empty_record()
            record = _empty_record()
            record["probe_step"], record["depth_consistency"] = (
                probes["probe_step"],
                probes["depth_consistency"],
            )
            record["parameters"] = names
            self._history[name] = record
        keep = record["step"] < steps[0]
        width = max(record["depth_profile"].shape[1], profiles.shape[1])
        record["step"] = torch.cat([record["step"][keep], steps])
        record["metrics"] = torch.cat(
            [record["metrics"][keep].reshape(-1, *tables.shape[1:]), tables]
        )
        record["depth_profile"] = torch.cat(
            [_pad(record["depth_profile"][keep], width), _pad(profiles, width)]
        )
        return self._non_finite(name, names, steps, tables)

    def _non_finite(self, stage: str, names: list[str], steps: Tensor, tables: Tensor) -> list[str]:
        """``"name (from step s)"`` for each parameter newly seen with non-finite values."""
        bad = ~torch.isfinite(tables[..., METRICS.index("weight_norm")])
        found = []
        for row, name in enumerate(names):
            if name == ALL or (stage, name) in self._warned or not bad[:, row].any():
                continue
            self._warned.add((stage, name))
            found.append(f"{name} (from step {int(steps[bad[:, row]][0])})")
        return found

    def _probe(self, pl_module) -> dict[str, Tensor]:
        caches = self._stages(pl_module)
        inputs: dict[str, Tensor] = {}
        handles = [
            cache.stage.blocks[0].register_forward_pre_hook(_Capture(cache.stage.name, inputs))
            for cache in caches
        ]
        try:
            with torch.inference_mode(False), torch.no_grad():
                x = self._probe_input.to(pl_module.device).clone()
                pl_module(x)
                return {
                    cache.stage.name: depth_consistency(
                        cache.stage, inputs[cache.stage.name].clone()
                    )
                    for cache in caches
                    if cache.stage.name in inputs
                }
        finally:
            for handle in handles:
                handle.remove()


class _Capture:
    """Forward pre-hook storing a module's input under ``name`` (picklable, no closure)."""

    def __init__(self, name: str, store: dict[str, Tensor]) -> None:
        self.name = name
        self.store = store

    def __call__(self, module, args: tuple) -> None:
        self.store.setdefault(self.name, args[0].detach())


def _check_positive(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"SmoothnessMonitor({name}=...) must be {allowed}, got {value!r}")


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return _first_tensor(batch[0])
    if isinstance(batch, dict) and batch:
        return _first_tensor(next(iter(batch.values())))
    return None


def _pad(values: Tensor, width: int) -> Tensor:
    missing = width - values.shape[-1]
    if missing <= 0:
        return values
    return torch.nn.functional.pad(values, (0, missing), value=float("nan"))


def _empty_record() -> dict[str, Any]:
    return {
        "step": torch.zeros(0, dtype=torch.int64),
        "parameters": [],
        "metrics": torch.zeros(0, 0, len(METRICS)),
        "depth_profile": torch.zeros(0, 0),
        "probe_step": torch.zeros(0, dtype=torch.int64),
        "depth_consistency": torch.zeros(0),
    }


def _log_dir(trainer) -> str | os.PathLike:
    logger = trainer.logger
    for attribute in ("log_dir", "save_dir"):
        directory = getattr(logger, attribute, None) if logger is not None else None
        if directory:
            return directory
    return trainer.default_root_dir
