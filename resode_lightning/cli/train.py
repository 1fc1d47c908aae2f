"""``resode fit|validate|test|predict``: LightningCLI over ImageClassifier and the DataModules.

``data`` is any :class:`~resode_lightning.data.ImageDataModule` (``class_path`` and
``init_args``): the package's digits, CIFAR-10 and image-folder modules, or your subclass. Its
``num_classes`` and ``channels`` set the model's ``num_classes`` and ``in_channels``.

``--ckpt_path`` takes a local Lightning checkpoint file (``resode fit`` writes them), read once
by the package's safe reader and checked against the model before Lightning reads it
(:mod:`~resode_lightning.cli._checkpoint`); ``fit`` also takes Lightning's ``last``. Its
``hyper_parameters`` never choose what is imported: a ``class_path`` in them must be one the
config or command line names.

Config files and values (YAML or JSON) are bounded before they are parsed
(:mod:`~resode_lightning.cli._config`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from resode_lightning.cli._checkpoint import (
    check_fits,
    check_hyper_parameters,
    check_optimizer_states,
    class_paths,
    read_checkpoint,
    stored_values,
)
from resode_lightning.cli._config import (
    PARSER_MODE,
    ConfigError,
    check_config_arguments,
    one_line,
)
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.data.base import DataError, ImageDataModule
from resode_lightning.lit.classifier import ImageClassifier

COMMANDS: dict[str, str] = {
    "fit": "train a model (resode fit --config configs/digits_ode_resnet.yaml)",
    "validate": "evaluate a model on the validation split (--ckpt_path to load weights)",
    "test": "evaluate a model on the test split (--ckpt_path to load weights)",
    "predict": "class probabilities on the test split (--ckpt_path to load weights)",
}

# what building the config's objects raises for a bad value or a missing file
_CONFIG_ERRORS = (ValueError, OSError, TypeError, MisconfigurationException)


class SetupError(Exception):
    """A config that parses but whose objects cannot be built (bad value, missing data)."""


class ResodeCLI(LightningCLI):
    """LightningCLI with the data's class count and channels linked into the model, and
    ``--ckpt_path`` checked before Lightning reads it."""

    _checkpoint: tuple[str, dict[str, Any]] | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        # --ckpt_path loads with torch.load(weights_only=True) unless the user asks otherwise
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in {action.dest for action in parser._actions}:
            parser.set_defaults(weights_only=True)
        return parser

    def _parse_ckpt_path(self) -> None:
        # Lightning's own version loads the file again and merges its hyperparameters unchecked
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is None or (subcommand == "fit" and str(path) == "last"):
            return
        content = read_checkpoint(path, subcommand)
        self._checkpoint = str(path), content
        config = self.config[subcommand]
        hyper_parameters = check_hyper_parameters(
            content.get("hyper_parameters", {}),
            str(path),
            model=config.get("model", Namespace()).as_dict(),
            allowed=class_paths(config.as_dict()),
            stored=stored_values(content["state_dict"]),
        )
        if hyper_parameters:
            merged = {subcommand: {"model": hyper_parameters}}
            self.config = self.parser.parse_object(merged, self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _CONFIG_ERRORS as error:
            raise SetupError(str(_root_cause(error))) from error

    def _run_subcommand(self, subcommand: str) -> None:
        if self._checkpoint is not None:
            path, content = self._checkpoint
            self._checkpoint = None
            check_fits(self.model, content, path)
            if subcommand == "fit":
                check_optimizer_states(self.model, content, path)
            del content  # Lightning reads the file again to restore it: one copy at a time
        super()._run_subcommand(subcommand)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error of a chain: jsonargparse wraps a class's own error in its messages."""
    while True:
        inner = error.__cause__ or error.__context__
        if not isinstance(inner, _CONFIG_ERRORS):
            return error
        error = inner


def cli(args: Sequence[str] | None = None, *, run: bool = True, **kwargs: object) -> ResodeCLI:
    """Build (and with ``run`` execute) the training CLI on ``args`` (default: ``sys.argv[1:]``).

    ``args`` start with the subcommand when ``run`` is true (``["fit", "--config", ...]``); with
    ``run=False`` they hold only options, and the caller drives ``cli.trainer``.

    Raises:
        ConfigError: a config file or value of ``args`` is nested too deep or too large (see
            :func:`~resode_lightning.cli._config.check_config_text`), checked before anything
            is parsed.
    """
    check_config_arguments(sys.argv[1:] if args is None else args)
    return ResodeCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "resode",
            "description": "Train and evaluate residual networks.",
            "parser_mode": PARSER_MODE,
        },
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
    except (
        SetupError,
        ConfigError,
        DataError,
        CheckpointError,
        FileNotFoundError,
        MisconfigurationException,
    ) as error:
        print(f"resode {command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0
