"""``resode fit|validate|test|predict``: LightningCLI over ImageClassifier and the DataModules.

``data`` is any :class:`~resode_lightning.data.ImageDataModule` (``class_path`` and
``init_args``): the package's digits, CIFAR-10 and image-folder modules, or your subclass. Its
``num_classes`` and ``channels`` set the model's ``num_classes`` and ``in_channels``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from resode_lightning.core.io import CheckpointError
from resode_lightning.data.base import DataError, ImageDataModule
from resode_lightning.lit.classifier import ImageClassifier

COMMANDS: dict[str, str] = {
    "fit": "train a model (resode fit --config configs/digits_ode_resnet.yaml)",
    "validate": "evaluate a model on the validation split (--ckpt_path to load weights)",
    "test": "evaluate a model on the test split (--ckpt_path to load weights)",
    "predict": "class probabilities on the test split (--ckpt_path to load weights)",
}


class SetupError(Exception):
    """A config that parses but whose objects cannot be built (bad value, missing data)."""


class ResodeCLI(LightningCLI):
    """LightningCLI with the data's class count and channels linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        # --ckpt_path loads with torch.load(weights_only=True) unless the user asks otherwise
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in {action.dest for action in parser._actions}:
            parser.set_defaults(weights_only=True)
        return parser

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, OSError, TypeError) as error:
            raise SetupError(str(_root_cause(error))) from error


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error of a chain: jsonargparse wraps a class's own error in its messages."""
    while True:
        inner = error.__cause__ or error.__context__
        if not isinstance(inner, (ValueError, OSError, TypeError)):
            return error
        error = inner


def cli(args: Sequence[str] | None = None, *, run: bool = True, **kwargs: object) -> ResodeCLI:
    """Build (and with ``run`` execute) the training CLI on ``args`` (default: ``sys.argv[1:]``).

    ``args`` start with the subcommand when ``run`` is true (``["fit", "--config", ...]``); with
    ``run=False`` they hold only options, and the caller drives ``cli.trainer``.
    """
    return ResodeCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "resode", "description": "Train and evaluate residual networks."},
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one training subcommand (first of ``argv``, default the process arguments, in
    :data:`COMMANDS`); returns the exit status."""
    command = (sys.argv[1:] if argv is None else argv)[0]
    try:
        cli(argv)
    except (SetupError, DataError, CheckpointError, FileNotFoundError) as error:
        print(f"resode {command}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0
