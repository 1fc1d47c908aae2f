"""What ``--arch`` names, one spec for every subcommand, and how the named model is built.

A spec is one of:

- a torchvision ResNet name (``resnet50``, ``wide_resnet50_2``…); left out, it is inferred from
  the checkpoint's keys and shapes;
- ``ode_resnet``, this package's pre-activation ODE-ResNet;
- ``timm:NAME``, a model of the installed timm;
- ``package.module:callable``, the user's own constructor, imported from the current folder or
  the installed packages (like ``uvicorn main:app``).

``--arch-kwargs`` (a JSON object) goes to the builder. Only the command line chooses what is
imported: a checkpoint's content never names code to run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.core.models import LIMITS, TORCHVISION_RESNETS, ode_resnet, torchvision_resnet
from resode_lightning.core.odeform import load_into, strip_prefix
from resode_lightning.lit.classifier import check_backbone_size

TIMM = "timm:"
FORMS = (
    f"a torchvision ResNet ({', '.join(TORCHVISION_RESNETS)}), ode_resnet, timm:NAME or "
    f"package.module:callable"
)
"""What ``--arch`` accepts, as its help and its errors say it."""
SIZE_ARGUMENTS = {
    "torchvision": ("num_classes", None),
    "ode_resnet": ("num_classes", "in_channels"),
    "timm": ("num_classes", "in_chans"),
}
"""Per family, the builder's arguments for the head size and the input channels."""


@dataclass(frozen=True)
class Architecture:
    """A parsed ``--arch``: its spec as typed, its family and its builder."""

    spec: str
    family: str
    """``"torchvision"``, ``"ode_resnet"``, ``"timm"`` or ``"user"``."""
    builder: Callable[..., nn.Module]

    def call(self, **kwargs: Any) -> nn.Module:
        """The builder's model for ``kwargs``.

        Raises:
            ValueError: the builder refuses them or returns no ``nn.Module``, or they are beyond
                the package's architecture limits; the message says so.
        """
        if self.family == "ode_resnet":  # checked before anything is built
            sizes = kwargs.get("num_classes", 10), kwargs.get("in_channels", 3)
            check_backbone_size("ode_resnet", kwargs, *sizes)
        try:
            model = self.builder(**kwargs)
        except Exception as error:  # the user's or a library's builder, refusing its arguments
            raise ValueError(
                f"--arch {self.spec} cannot be built with --arch-kwargs {kwargs}: "
                f"{type(error).__name__}: {error}"
            ) from None
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"--arch {self.spec} returned a {type(model).__name__}, not a torch nn.Module"
            )
        return model

    def build(
        self, kwargs: Mapping[str, Any], state_dict: Mapping[str, Tensor], *, max_classes: int
    ) -> nn.Module:
        """The model with ``kwargs``, sized to hold ``state_dict`` (head and input channels read
        from it where the family's builder takes them), loaded from it, in eval mode.

        Raises:
            ValueError: the builder refuses ``kwargs``, or ``state_dict`` does not fit the model
                (:class:`~resode_lightning.CheckpointError`); the message names the cause.
        """
        clash = sorted(set(kwargs) & {n for n in SIZE_ARGUMENTS.get(self.family, ()) if n})
        if clash:
            raise ValueError(
                f"--arch-kwargs sets {', '.join(clash)}, which the checkpoint decides; remove it"
            )
        sizes = _sizes(self, kwargs, state_dict, max_classes)
        model = self.call(**kwargs, **sizes)
        return load_into(model, strip_prefix(dict(state_dict), model)).eval()


def architecture(spec: str) -> Architecture:
    """An argparse ``type``: the :class:`Architecture` that ``spec`` names.

    Raises:
        argparse.ArgumentTypeError: ``spec`` names nothing, an unknown timm model, a module
            that cannot be imported or an attribute that is not callable; the message says which
            and what is accepted.
    """
    if spec in TORCHVISION_RESNETS:
        return Architecture(spec, "torchvision", lambda **kw: torchvision_resnet(spec, **kw))
    if spec == "ode_resnet":
        return Architecture(spec, "ode_resnet", ode_resnet)
    if spec.startswith(TIMM):
        return Architecture(spec, "timm", _timm_builder(spec.removeprefix(TIMM)))
    module, colon, attribute = spec.partition(":")
    if not colon or not module or not attribute:
        raise argparse.ArgumentTypeError(f"unknown architecture {spec!r}: give {FORMS}")
    return Architecture(spec, "user", _user_builder(module, attribute))


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise argparse.ArgumentTypeError(f"timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise argparse.ArgumentTypeError(
            f"timm:{name}: timm {timm.__version__} has no model {name!r}; see "
            f"timm.list_models() for the names"
        )
    return lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs)


def _user_builder(module_name: str, attribute: str) -> Callable[..., nn.Module]:
    spec = f"{module_name}:{attribute}"
    if os.getcwd() not in sys.path:  # the user's package in the folder the command runs in
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise argparse.ArgumentTypeError(
            f"{spec}: no module named {error.name!r} in the current folder or the installed "
            f"packages; run from the folder that holds {module_name.split('.')[0]!r} or install it"
        ) from None
    except Exception as error:  # the user's module failing as it is imported
        raise argparse.ArgumentTypeError(
            f"{spec}: importing {module_name} failed: {type(error).__name__}: {error}"
        ) from None
    builder = getattr(module, attribute, None)
    if not callable(builder):
        what = "has no attribute" if builder is None else "has a non-callable"
        raise argparse.ArgumentTypeError(
            f"{spec}: module {module_name} {what} {attribute!r}; name a function or class that "
            f"builds the model"
        )
    return builder


def _sizes(
    arch: Architecture, kwargs: Mapping[str, Any], state: Mapping[str, Tensor], max_classes: int
) -> dict[str, int]:
    """The builder arguments the checkpoint decides (its head size; its input channels where the
    builder takes them), bounded before the model is built."""
    if arch.family == "user":
        return {}
    classes, channels = SIZE_ARGUMENTS[arch.family]
    with torch.device("meta"):  # names and shapes, no memory
        skeleton = arch.call(**kwargs)
    state = strip_prefix(dict(state), skeleton)  # a Lightning checkpoint's "model." prefix
    head = f"{_head(arch, skeleton)}.weight"
    if head not in state or state[head].dim() < 2:
        raise CheckpointError(
            f"the checkpoint has no {head!r} matrix: it is not a {arch.spec} state dict"
        )
    sizes = {classes: state[head].shape[0]}
    if sizes[classes] > max_classes:
        raise CheckpointError(
            f"{head!r} declares {sizes[classes]:,} classes, more than --max-classes "
            f"{max_classes:,}; pass a larger --max-classes if that is intended"
        )
    stem = next((n for n, m in skeleton.named_modules() if isinstance(m, nn.Conv2d)), None)
    if channels and f"{stem}.weight" in state and state[f"{stem}.weight"].dim() == 4:
        sizes[channels] = state[f"{stem}.weight"].shape[1]
        if sizes[channels] > LIMITS["in_channels"]:
            raise CheckpointError(
                f"{stem + '.weight'!r} declares {sizes[channels]:,} input channels, more than "
                f"{LIMITS['in_channels']}"
            )
    return sizes


def _head(arch: Architecture, skeleton: nn.Module) -> str:
    if arch.family == "timm":
        return skeleton.pretrained_cfg["classifier"]
    return "fc"
