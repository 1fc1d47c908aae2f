"""Image classifier
================

A LightningModule that trains any residual backbone with cross-entropy, reports top-1 (and
top-5) accuracy, and exposes every choice as a typed ``__init__`` argument for LightningCLI.
:class:`ImageClassifier` is a ``pytorch_lightning`` module;
:class:`resode_lightning.lit.lightning_pytorch.ImageClassifier` is the same for
``lightning.pytorch``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from resode_lightning.core.io.checkpoint import load_state_dict_file
from resode_lightning.core.models import (
    LIMITS,
    TORCHVISION_RESNETS,
    check_ode_resnet_arguments,
    ode_resnet,
    torchvision_resnet,
)
from resode_lightning.core.odeform import load_into, strip_prefix

BACKBONES: tuple[str, ...] = ("ode_resnet", *TORCHVISION_RESNETS)


class ImageClassifierMixin:
    """What :class:`ImageClassifier` computes, logs and optimises, free of a Lightning namespace:
    mixed into a ``LightningModule`` of either (see :mod:`resode_lightning._lightning`)."""

    def __init__(
        self,
        backbone: str | nn.Module = "ode_resnet",
        backbone_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Literal["cosine", "constant"] = "cosine",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if not lr > 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0 and 0 <= momentum < 1, got lr={lr!r}, "
                f"weight_decay={weight_decay!r}, momentum={momentum!r}"
            )
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if num_classes < 2 or in_channels < 1:
            raise ValueError(
                f"need num_classes >= 2 and in_channels >= 1, got {num_classes}, {in_channels}"
            )
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else [])
        if isinstance(backbone, nn.Module):
            if weights is not None:
                load_into(backbone, load_state_dict_file(weights))
            self.backbone = backbone
        else:
            self.backbone = build_backbone(
                backbone, backbone_kwargs or {}, num_classes, in_channels, weights
            )
        self.train_metrics = _accuracy(num_classes, "train")
        self.val_metrics = _accuracy(num_classes, "val")
        self.test_metrics = _accuracy(num_classes, "test")

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(logits.detach(), labels)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split != "train")
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    @override
    def predict_step(
        self, batch: Tensor | tuple[Tensor, ...] | list[Tensor], batch_idx: int
    ) -> Tensor:
        """Class probabilities, ``(batch, num_classes)``."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(-1)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.momentum > 0,
                weight_decay=hp.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Adopt the ODE form the checkpoint's marker buffers record before Lightning loads it.
        state = checkpoint.get("state_dict", {})
        prefix = "backbone."
        backbone_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if backbone_state:
            load_into(self.backbone, backbone_state)


class ImageClassifier(ImageClassifierMixin, pl.LightningModule):
    r"""Cross-entropy classification with a residual backbone, SGD or AdamW and a cosine schedule.

    Args:
        backbone: a name — ``"ode_resnet"`` (built by :func:`~resode_lightning.ode_resnet` with
            ``backbone_kwargs``) or a torchvision ResNet (``"resnet18"``, ``"resnet50"``, ...,
            randomly initialised, nothing downloaded) — or a ready ``nn.Module`` mapping images to
            ``num_classes`` logits (in a config: ``class_path`` and ``init_args``).
        backbone_kwargs: keyword arguments of the named builder (e.g. ``depths``, ``widths``,
            ``init`` for ``ode_resnet``).
        weights: a local checkpoint (``.pth``, Lightning ``.ckpt``, ``.safetensors``) loaded into a
            named backbone with ``weights_only`` loading; a head with another number of classes
            than ``num_classes`` is replaced by a fresh ``fc`` layer (fine-tuning).
        num_classes: number of classes.
        in_channels: channels of the input images (a torchvision stem is rebuilt when not 3).
        optimizer: ``"sgd"`` (with Nesterov momentum when ``momentum > 0``) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        schedule: ``"cosine"`` (annealed to 0 over all optimizer steps of the fit, so it follows
            ``max_epochs`` or ``max_steps``) or ``"constant"``.
        label_smoothing: cross-entropy label smoothing in ``[0, 1)``.

    Raises:
        ValueError: an unknown backbone name or optimizer, or an argument out of range.
        FileNotFoundError, CheckpointError: ``weights`` is missing or does not fit the backbone.

    Logged metrics:
        ``train/loss``, ``train/acc`` (per step and epoch); ``val/loss``, ``val/acc``,
        ``test/loss``, ``test/acc`` (per epoch); ``{val,test}/acc_top5`` when
        ``num_classes > 5``.

    Example::

        >>> model = ImageClassifier("ode_resnet", backbone_kwargs={"depths": [8], "widths": [16]})
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """


def _accuracy(num_classes: int, split: str) -> MetricCollection:
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5 and split != "train":
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=f"{split}/")


def build_backbone(
    name: str,
    kwargs: dict[str, Any],
    num_classes: int,
    in_channels: int = 3,
    weights: str | None = None,
) -> nn.Module:
    """A named backbone with ``num_classes`` outputs, optionally loaded from a local checkpoint.

    Raises:
        ValueError: ``name`` is not ``"ode_resnet"`` or a torchvision ResNet name, or its sizes
            are beyond :data:`~resode_lightning.core.models.LIMITS` (checked before anything is
            built; see :func:`check_backbone_size`).
    """
    check_backbone_size(name, kwargs, num_classes, in_channels)
    state = None if weights is None else load_state_dict_file(weights)
    head_classes = num_classes if state is None else _head_classes(state, num_classes)
    if name == "ode_resnet":
        model = ode_resnet(**kwargs, num_classes=head_classes, in_channels=in_channels)
    else:
        model = torchvision_resnet(name, num_classes=head_classes, **kwargs)
        if in_channels != 3:
            old = model.conv1
            model.conv1 = nn.Conv2d(
                in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
            )
    if state is not None:
        load_into(model, strip_prefix(state, model))
        if head_classes != num_classes:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def check_backbone_size(
    name: str, kwargs: Mapping[str, Any], num_classes: int, in_channels: int
) -> None:
    """Raise ``ValueError`` naming the argument unless the backbone ``name`` with ``kwargs`` is
    within the package's :data:`~resode_lightning.core.models.LIMITS` (the limits of a saved
    ``ode_resnet`` spec: depth, width, blocks, classes, input channels).

    Raises:
        ValueError: ``name`` is not one of :data:`BACKBONES`, or an argument is out of range.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(BACKBONES)}")
    if name != "ode_resnet":
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not _count(value, LIMITS[key]):
                raise ValueError(f"{key} must be an int in [1, {LIMITS[key]:,}], got {value!r}")
        return
    arguments = {**_ode_resnet_arguments(kwargs), "num_classes": num_classes}
    check_ode_resnet_arguments(arguments | {"in_channels": in_channels}, field="ode_resnet: ")


def least_weights(name: str, kwargs: Mapping[str, Any], num_classes: int) -> int:
    """A lower bound of the number of weights of the backbone ``name`` built with ``kwargs`` and
    ``num_classes`` outputs, computed without building it (``name`` and ``kwargs`` passed
    :func:`check_backbone_size`).

    Raises:
        ValueError: a torchvision ``groups`` or ``width_per_group`` is not a positive int.
    """
    if name == "ode_resnet":
        arguments = _ode_resnet_arguments(kwargs)
        depths, widths = arguments["depths"], arguments["widths"]
        convolutions = sum(2 * 9 * depth * width**2 for depth, width in zip(depths, widths))
        return convolutions + num_classes * widths[-1]
    groups, per_group = kwargs.get("groups", 1), kwargs.get("width_per_group", 64)
    for key, value in (("groups", groups), ("width_per_group", per_group)):
        if not _count(value, 2**31):
            raise ValueError(f"{name} with {key} {value!r}, not a positive int")
    width = 512 * per_group // 64 * groups  # of the 3x3 convolutions of the last stage
    return 9 * width * width // groups + num_classes * 512


def _ode_resnet_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` over :func:`~resode_lightning.ode_resnet`'s defaults, sizes as lists."""
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(ode_resnet).parameters.items()
    }
    arguments = {**defaults, **kwargs}
    for key in ("depths", "widths"):
        if isinstance(arguments[key], tuple):
            arguments[key] = list(arguments[key])
    return arguments


def _count(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit


def _head_classes(state: dict[str, Tensor], default: int) -> int:
    heads = [
        v
        for k, v in state.items()
        if (k == "fc.weight" or k.endswith(".fc.weight")) and v.dim() == 2
    ]
    return heads[0].shape[0] if heads else default
