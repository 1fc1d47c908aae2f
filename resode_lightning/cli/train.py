"""``resode fit|validate|test|predict``: LightningCLI over ImageClassifier and the DataModules.

``data`` is any :class:`~resode_lightning.data.ImageDataModule` (``class_path`` and
``init_args``): the package's digits, CIFAR-10 and image-folder modules, or your subclass. Its
``num_classes`` and ``channels`` set the model's ``num_classes`` and ``in_channels``.

``--ckpt_path`` takes a local Lightning checkpoint file (``resode fit`` writes them), checked as
:func:`~resode_lightning.load_state_dict_file` checks a file, and against the model, before
Lightning reads it; ``fit`` also takes Lightning's ``last``.
"""

from __future__ import annotations

import copy
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from resode_lightning.core.files import CheckpointError, load_state_dict_file
from resode_lightning.data.base import DataError, ImageDataModule
from resode_lightning.lit.classifier import ImageClassifier

COMMANDS: dict[str, str] = {
    "fit": "train a model (resode fit --config configs/digits_ode_resnet.yaml)",
    "validate": "evaluate a model on the validation split (--ckpt_path to load weights)",
    "test": "evaluate a model on the test split (--ckpt_path to load weights)",
    "predict": "class probabilities on the test split (--ckpt_path to load weights)",
}


# the loop state each subcommand restores from a checkpoint
_LOOPS = {
    "fit": "fit_loop",
    "validate": "validate_loop",
    "test": "test_loop",
    "predict": "predict_loop",
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
        # runs before Lightning reads the checkpoint for its hyperparameters
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is not None and not (subcommand == "fit" and str(path) == "last"):
            self._checkpoint = str(path), read_checkpoint(path, subcommand)
        super()._parse_ckpt_path()

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
        super()._run_subcommand(subcommand)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error of a chain: jsonargparse wraps a class's own error in its messages."""
    while True:
        inner = error.__cause__ or error.__context__
        if not isinstance(inner, _CONFIG_ERRORS):
            return error
        error = inner


def read_checkpoint(path: str | Path, subcommand: str) -> dict[str, Any]:
    """The content of the Lightning checkpoint ``path`` for ``resode <subcommand> --ckpt_path``.

    The file gets the checks of :func:`~resode_lightning.load_state_dict_file` (nothing in it is
    executed) and must hold what ``subcommand`` restores: the weights, and for ``fit`` the
    optimizer and scheduler states.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        CheckpointError: ``path`` is Lightning's ``"best"`` or ``"last"`` (a fit of the same
            process), or the file is not a readable Lightning checkpoint with what
            ``subcommand`` restores; the message names the file.
    """
    text = str(path)
    if text in ("best", "last"):
        raise CheckpointError(
            f"--ckpt_path {text!r} means the {text} checkpoint of a fit run in the same process, "
            f"and resode {subcommand} has none; give the checkpoint file, e.g. --ckpt_path "
            f"runs/NAME/version_0/checkpoints/last.ckpt"
        )
    not_lightning = (
        f"{text} holds weights only, not a Lightning checkpoint written by resode fit: pass it as "
        f"--model.weights {text} to start from these weights"
    )
    if Path(text).suffix == ".safetensors":
        raise CheckpointError(not_lightning)
    load_state_dict_file(text)
    try:
        content = torch.load(
            text, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(text)
        )
    except Exception as error:  # the file changed since it was checked
        raise CheckpointError(
            f"{text} could not be read after its check ({type(error).__name__}); was it being "
            f"written? Run the command again once the file is complete"
        ) from None
    if not isinstance(content.get("state_dict"), Mapping):
        raise CheckpointError(not_lightning)
    version = content.get("pytorch-lightning_version")
    try:
        Version(version)
    except (InvalidVersion, TypeError):
        raise CheckpointError(
            f"{text} has no valid 'pytorch-lightning_version' (found {version!r}): it was not "
            f"written by Lightning, or is damaged"
        ) from None
    hyper_parameters, loops = content.get("hyper_parameters", {}), content.get("loops")
    if not isinstance(hyper_parameters, Mapping):
        raise CheckpointError(
            f"{text}: its 'hyper_parameters' entry is of type {type(hyper_parameters).__name__}, "
            f"not a mapping; the file is damaged"
        )
    if loops is not None and not (
        isinstance(loops, Mapping) and isinstance(loops.get(_LOOPS[subcommand]), Mapping)
    ):
        raise CheckpointError(f"{text} has no {_LOOPS[subcommand]!r} state; the file is damaged")
    if subcommand == "fit" and not all(
        isinstance(content.get(key), list) for key in ("optimizer_states", "lr_schedulers")
    ):
        raise CheckpointError(
            f"{text} holds no optimizer and scheduler state (a checkpoint of the weights alone?), "
            f"so fit cannot resume from it; to start a new fit from its weights pass "
            f"--model.weights {text} instead of --ckpt_path"
        )
    return content


def check_fits(model: LightningModule, content: Mapping[str, Any], path: str) -> None:
    """Raise unless the checkpoint ``content`` (of file ``path``) loads into ``model``.

    ``model`` is not modified.

    Raises:
        CheckpointError: the weights do not match the model of the config; the message names
            the file.
    """
    probe = copy.deepcopy(model)
    try:
        probe.on_load_checkpoint(dict(content))
        result = probe.load_state_dict(content["state_dict"], strict=False)
    except (ValueError, RuntimeError) as error:  # CheckpointError, load_state_dict's errors
        raise CheckpointError(
            f"{path} does not fit the model of this config: {_one_line(error)}; use the config "
            f"the checkpoint was trained with"
        ) from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if probe.strict_loading and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not fit the model of this config: {len(missing)} missing key(s) "
            f"{_head(missing)}, {len(unexpected)} unexpected key(s) {_head(unexpected)}; use the "
            f"config the checkpoint was trained with"
        )


def _head(keys: list[str], count: int = 4) -> str:
    return "[" + ", ".join(keys[:count]) + (", ...]" if len(keys) > count else "]")


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


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
    except (
        SetupError,
        DataError,
        CheckpointError,
        FileNotFoundError,
        MisconfigurationException,
    ) as error:
        print(f"resode {command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0
