"""Depth distillation on a Lightning ``Trainer``: a trained ResNet made into a neural ODE that
runs at any step count.

The source is exported with its BatchNorm folded (nothing left in the stages depends on batch
statistics, so every step count computes with the same weights) and, optionally, its weight
path fitted at fewer knots. :class:`DepthDistillation` fine-tunes the export towards the
source's outputs (KL divergence to its softened logits) and the labels, and
:class:`~resode_lightning.DepthSampling` runs it at every other step count of the set on every
batch (the weighted sum of their losses): depth sampling with the expectation over the set
taken exactly, which measured better than one count drawn per batch at equal epochs. Progress
bar, loggers, precision and strategies are Lightning's; a checkpoint is written atomically after
every epoch and a run started again with it resumes where it stopped, once every field of the
file is validated. A run whose loss or weights turn NaN or inf stops with an error naming the
epoch and batch, and writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities.migration import migrate_checkpoint
from torch import Tensor, nn
from typing_extensions import override

from resode_lightning.callbacks.depth_sampling import DepthSampling
from resode_lightning.core.io.atomic import atomic_save, writable_target
from resode_lightning.core.io.checkpoint import safe_torch_load
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.export.anytime import resolve_steps, set_steps
from resode_lightning.export.distill import (
    CHECKPOINT_FORMAT,
    check_settings,
    checked_resume,
    distillation_loss,
    distillation_student,
    first_non_finite,
    schedule,
)
from resode_lightning.export.options import ExportOptions


class DepthDistillation(pl.LightningModule):
    """Fine-tunes an exported ``student`` towards a frozen ``teacher`` (its source) and the
    labels, with AdamW and a cosine schedule over all optimizer steps of the fit.

    The student stays in eval mode (norms outside its stages keep their running statistics);
    the teacher is held outside the module's parameters, state dict and optimizer, and moved to
    the module's device when fitting starts. Batches are ``(images, labels, ...)``. Its loss is
    the full-depth pass's times ``full_weight``; :meth:`pass_loss` is the loss of another step
    count, for :class:`~resode_lightning.DepthSampling`. Logs ``distill/loss`` (full depth).

    Args:
        student: the export to train.
        teacher: the trained source.
        lr, warmup, weight_decay, temperature, label_weight: see ``distill_depth``.
        full_weight: the weight of the full-depth loss.
        settings: what a checkpoint records and a resume must match (JSON data).
        checkpoint: the file the fit writes after every epoch, named when training diverges.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        lr: float,
        warmup: float = 0.0,
        weight_decay: float = 0.0,
        temperature: float = 2.0,
        label_weight: float = 0.5,
        full_weight: float = 1.0,
        settings: Mapping[str, Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher.eval())
        self.lr, self.warmup, self.weight_decay = lr, warmup, weight_decay
        self.temperature, self.label_weight = temperature, label_weight
        self.full_weight = full_weight
        self.settings, self.checkpoint = dict(settings or {}), checkpoint
        self.per_epoch = 0
        """Optimizer steps per epoch, set by ``distill_depth`` (the loader's length)."""
        self._target: Tensor | None = None
        self._first_bad: tuple[Tensor, Tensor] | None = None

    @override
    def train(self, mode: bool = True) -> DepthDistillation:
        super().train(mode)
        self.student.eval()
        return self

    @override
    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    @override
    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    @override
    def on_train_epoch_start(self) -> None:
        self._first_bad = (
            torch.full((), -1, device=self.device),
            torch.zeros((), device=self.device),
        )

    @override
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        with torch.no_grad():
            self._target = self.teacher(images)
        loss = self.pass_loss(self(images), None, batch)
        index, value = self._first_bad
        bad = ~torch.isfinite(loss.detach()) & (index < 0)
        self._first_bad = torch.where(bad, batch_idx, index), torch.where(bad, loss.detach(), value)
        self.log("distill/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss * self.full_weight

    def pass_loss(self, logits: Tensor, full: Tensor | None, batch: Sequence[Tensor]) -> Tensor:
        """The distillation loss of ``logits`` on the batch the teacher last saw."""
        return distillation_loss(
            logits, self._target, batch[1], self.temperature, self.label_weight
        )

    @override
    def on_train_epoch_end(self) -> None:
        """Raise before the epoch's checkpoint is written when the loss or the weights turned
        NaN or inf."""
        epochs, epoch = self.trainer.max_epochs, self.current_epoch + 1
        where, what = None, None
        index, value = self._first_bad  # read once per epoch
        if int(index) >= 0:
            batches = self.trainer.num_training_batches
            where = f"epoch {epoch}/{epochs}, batch {int(index) + 1}/{batches}"
            what = f"the loss is {float(value)}"
        else:
            poisoned = first_non_finite(self._trained_tensors())
            if poisoned is not None:
                where, what = f"the end of epoch {epoch}/{epochs}", f"{poisoned} holds NaN or inf"
        if where is not None:
            checkpoint = self.checkpoint
            kept = f" ({checkpoint} keeps the last epoch finished)" if checkpoint else ""
            raise ValueError(
                f"distillation diverged at {where}: {what}; stopped before writing this "
                f"epoch{kept}; lower the learning rate or add a warm-up, and check the data for "
                f"NaN or inf"
            )

    def _trained_tensors(self) -> Iterable[tuple[str, Tensor]]:
        for key, value in self.student.state_dict().items():
            yield f"the student's {key!r}", value
        for index, entry in self.optimizers().optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    yield f"the optimizer's {key} of parameter {index}", value

    @override
    def configure_optimizers(self) -> Any:
        parameters = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.max_epochs * self.per_epoch
        scheduler = schedule(optimizer, total, self.warmup)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["distillation"] = {
            "format": CHECKPOINT_FORMAT,
            "settings": json.dumps(self.settings, sort_keys=True),
        }

    def checked(self, path: Path, content: object) -> dict[str, Any]:
        """The checkpoint ``content`` read from ``path``, validated for this run (see
        :func:`~resode_lightning.export.distill.checked_resume`) and migrated to the running
        Lightning; its loop counters must have the shape and types of this trainer's.

        Raises:
            CheckpointError: the message names the file and what is wrong.
        """
        trainer = self.trainer
        checked = checked_resume(
            path,
            content,
            settings=self.settings,
            student=self.student,
            epochs=trainer.max_epochs,
            per_epoch=self.per_epoch,
        )
        loops = ("fit_loop", "validate_loop", "test_loop", "predict_loop")
        template = {name: getattr(trainer, name).state_dict() for name in loops}
        _check_loops(path, checked["loops"], template)
        try:
            return migrate_checkpoint(checked)[0]
        except Exception as error:  # noqa: BLE001 - Lightning's migrations index what they expect
            raise CheckpointError(
                f"{path} claims Lightning {checked.get('pytorch-lightning_version')!r}, from "
                f"which Lightning cannot migrate it ({type(error).__name__}); remove it to start "
                f"over"
            ) from None


def _check_loops(path: Path, found: object, template: object, key: str = "loops") -> None:
    """Raise ``CheckpointError`` unless ``found`` has ``template``'s keys, nesting and types,
    its counters whole numbers in ``[0, 2**53]``."""
    if isinstance(template, dict):
        if not isinstance(found, dict) or set(found) - set(template):
            raise CheckpointError(f"{path}: {key} is not the state of Lightning's loops")
        for name, value in template.items():
            if name not in found:
                raise CheckpointError(f"{path}: {key} lacks {name!r}; the file is damaged")
            _check_loops(path, found[name], value, f"{key}.{name}")
    elif isinstance(template, int) and not isinstance(template, bool):
        if type(found) is not int or not 0 <= found <= 2**53:
            raise CheckpointError(f"{path}: {key} must be a count, found {found!r:.40}")
    elif type(found) is not type(template) and template is not None:
        raise CheckpointError(f"{path}: {key} must be a {type(template).__name__}")


class _SafeCheckpointIO(CheckpointIO):
    """Writes checkpoints atomically and reads them through the package's safe reader, then
    :meth:`DepthDistillation.checked`."""

    def __init__(self, module: DepthDistillation) -> None:
        self.module = module

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        atomic_save(checkpoint, path)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        return self.module.checked(Path(path), safe_torch_load(path))

    @override
    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


class _EveryEpoch(Checkpoint):
    """Saves the fit at ``path`` at the end of every training epoch (after the module's
    checks)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def distill_depth(
    source: nn.Module,
    loader: Iterable[Any],
    *,
    steps: Sequence[float | int] = (1.0, 0.5, 0.25),
    step_weights: Sequence[float] | None = None,
    epochs: int = 5,
    knots: int | None = None,
    lr: float = 1e-4,
    warmup: float = 0.0,
    weight_decay: float = 0.0,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    options: ExportOptions | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    trainer: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A neural ODE export of ``source`` fine-tuned to be right at every step count of ``steps``.

    Runs :class:`DepthDistillation` with :class:`~resode_lightning.DepthSampling` on a Lightning
    ``Trainer`` (one optimizer step per batch, ``epochs`` epochs).

    Args:
        source: the trained network (torchvision, timm, ``ode_resnet`` or any model with
            registered blocks), in eval mode; it is moved to the training device, not changed.
        loader: training batches ``(images, labels, ...)``, with a length (a DataLoader).
        steps: the step counts trained, each on every batch, for every stage: fractions of
            each stage's depth (``1.0, 0.5, 0.25``) or ints (see
            :func:`~resode_lightning.export.anytime.set_steps`). ``(1.0,)`` fine-tunes at full
            depth only.
        step_weights: the weight of each count's loss, in the order of ``steps`` (normalised
            to sum 1; ``None``: equal). On the digits benchmark's ODE-ResNet (one stage of 16
            blocks), ``(1, 2, 4)`` at ``(1.0, 0.5, 0.25)`` with ``lr=3e-3, warmup=0.1``
            measured closest to the source at L/2 and L/4 (see ``benchmarks/anytime.py``);
            not measured on production ResNets, hence not the default.
        epochs: passes over ``loader``.
        knots: fit each stage's weight path at this many knots first (``None``: one per block).
        lr: peak learning rate of AdamW (cosine schedule to 0 over all steps), in
            ``(0, MAX_LR]``. The default suits production ResNets (measured on a torchvision
            ResNet: 1e-4 keeps it, 3e-4 and above break it); small ODE-ResNets trained from
            scratch in ODE form, whose weights sit at the larger ODE scale, take 1e-3 to 3e-3.
        warmup: share of all steps over which the learning rate rises linearly from
            ``lr / (warmup steps)`` to ``lr`` before the cosine decay (0: none).
        weight_decay: AdamW's decoupled weight decay.
        temperature: softening of both logits in the distillation term.
        label_weight: weight of the cross-entropy on the labels; the distillation term has
            ``1 - label_weight``.
        options: export options (default: Euler, linear path, BatchNorm folded, backprop); a
            fixed-grid method, whose steps ``steps`` counts.
        checkpoint: file written after every epoch (a Lightning checkpoint) and resumed from
            when it exists (its directory is checked to be writable before training).
        device: where to train (default: the source's device).
        progress: show Lightning's progress bar.
        trainer: further ``Trainer`` arguments (``logger``, ``precision``, ``strategy``,
            ``callbacks``...); the epochs, the device and the checkpoints are set here.

    Returns:
        The fine-tuned export in eval mode, at the full depth of every stage; save it with
        :func:`~resode_lightning.save_neural_ode`, choose a budget with ``set_steps``.

    Raises:
        ValueError: an argument out of range; ``options`` with an adaptive method; ``source``
            holds NaN or inf; the loss or the weights turned NaN or inf during training (the
            message names the epoch and batch; ``checkpoint`` is left as it was).
        CheckpointError: ``checkpoint`` exists but is damaged, forged or was written for other
            settings (the message names the file and the differences).
        OSError: ``checkpoint`` cannot be written (see
            :func:`~resode_lightning.core.io.atomic.writable_target`).
    """
    check_settings(steps, step_weights, epochs, lr, warmup, weight_decay, temperature, label_weight)
    _length(loader)
    if checkpoint is not None:
        writable_target(checkpoint)
    options = (options or ExportOptions(gradient="backprop")).replace(knots=knots)
    student = distillation_student(source, options, steps)
    settings = {
        "steps": list(steps),
        "epochs": epochs,
        "knots": knots,
        "lr": lr,
        "weight_decay": weight_decay,
        "temperature": temperature,
        "label_weight": label_weight,
        "options": options.to_config(),
        "warmup": warmup,
        "step_weights": None if step_weights is None else [float(w) for w in step_weights],
    }
    weights = [float(w) for w in step_weights] if step_weights is not None else [1.0] * len(steps)
    shares = [w / sum(weights) for w in weights]
    full = resolve_steps(student, None)
    own = [resolve_steps(student, budget) == full for budget in steps]
    module = DepthDistillation(
        student,
        source,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        temperature=temperature,
        label_weight=label_weight,
        full_weight=sum(share for share, is_own in zip(shares, own) if is_own),
        settings=settings,
        checkpoint=checkpoint,
    )
    sampling = DepthSampling(
        steps, methods=(options.method,), weights=shares, loss=module.pass_loss
    )
    extra = dict(trainer or {})
    reserved = {"max_epochs", "max_steps", "plugins", "enable_checkpointing", "limit_train_batches"}
    reserved = sorted(set(extra) & reserved)
    if reserved:
        raise ValueError(
            f"distill_depth(trainer=...) sets {', '.join(reserved)}, which distill_depth decides "
            f"(epochs=..., checkpoint=...); remove it"
        )
    callbacks = [sampling, *extra.pop("callbacks", [])]
    if checkpoint is not None:
        callbacks.append(_EveryEpoch(checkpoint))
    device = torch.device(device) if device is not None else _device(source)
    arguments = {
        "accelerator": "gpu" if device.type == "cuda" else device.type,
        "devices": [device.index or 0] if device.type == "cuda" else 1,
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "logger": False,
        "num_sanity_val_steps": 0,
        **extra,
    }
    fit = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        plugins=[_SafeCheckpointIO(module)],
        enable_checkpointing=checkpoint is not None,  # then _EveryEpoch is the only one
        **arguments,
    )
    module.per_epoch = math.ceil(_length(loader) / fit.accumulate_grad_batches)
    resume = checkpoint is not None and Path(checkpoint).is_file()
    with warnings.catch_warnings():  # the student stays in eval mode, on purpose
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", UserWarning)
        fit.fit(module, loader, ckpt_path=os.fspath(checkpoint) if resume else None)
    set_steps(student, 1.0)
    return student.eval()


def _length(loader: Iterable[Any]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("distill_depth needs a loader with a length (a DataLoader)") from None


def _device(model: nn.Module) -> torch.device:
    reference = next(iter(model.parameters()), None)
    return reference.device if reference is not None else torch.device("cpu")
