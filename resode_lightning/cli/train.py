"""``resode fit|validate|test|predict``: LightningCLI over ImageClassifier and the DataModules.

``data`` is any :class:`~resode_lightning.data.ImageDataModule` (``class_path`` and
``init_args``): the package's digits, CIFAR-10 and image-folder modules, or your subclass. Its
``num_classes`` and ``channels`` set the model's ``num_classes`` and ``in_channels``.

``--ckpt_path`` takes a local Lightning checkpoint file (``resode fit`` writes them), checked as
:func:`~resode_lightning.load_state_dict_file` checks a file, and against the model, before
Lightning reads it; ``fit`` also takes Lightning's ``last``. Its ``hyper_parameters`` never choose
what is imported: a ``class_path`` in them must be one the config or command line names.

Config files and values (YAML or JSON) are bounded before they are parsed: at most
:data:`MAX_CONFIG_DEPTH` levels of nesting and :data:`MAX_CONFIG_NODES` values once YAML aliases
are expanded.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
import typing
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from packaging.version import InvalidVersion, Version
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.migration import migrate_checkpoint

from resode_lightning.core.files import CheckpointError, load_state_dict_file
from resode_lightning.data.base import DataError, ImageDataModule
from resode_lightning.lit.classifier import ImageClassifier, check_backbone_size, least_weights

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

MAX_CONFIG_DEPTH = 64
"""The deepest nesting of lists and mappings a config, a config value or a checkpoint's
``hyper_parameters`` may hold."""
MAX_CONFIG_NODES = 100_000
"""The most values a config (YAML aliases expanded) or a checkpoint's ``hyper_parameters`` may
hold."""
MAX_COUNTER = 2**31 - 1
"""The largest epoch, step or loop counter a checkpoint may hold."""

# the option whose value is a config file (or a config string)
_CONFIG_OPTIONS = ("--config", "-c")
# the parser mode of the CLI: jsonargparse's YAML loader behind check_config_text
_PARSER_MODE = "resode_yaml"
# checkpoint hyper-parameters that name no argument of the model and are dropped, as Lightning does
_DROPPED_HYPER_PARAMETERS = ("_instantiator",)
# the model arguments that choose the backbone's architecture and size
_ARCHITECTURE = frozenset({"backbone", "backbone_kwargs", "num_classes", "in_channels"})


class SetupError(Exception):
    """A config that parses but whose objects cannot be built (bad value, missing data)."""


class ConfigError(ValueError):
    """A config file or value nested too deep or too large once its YAML aliases are expanded."""


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
    check_counters(content, text)
    check_migration(content, text)
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


def check_counters(content: Mapping[str, Any], path: str) -> None:
    """Raise unless the checkpoint ``content`` is nested at most :data:`MAX_CONFIG_DEPTH` levels
    deep with at most :data:`MAX_CONFIG_NODES` entries, and its ``epoch``, ``global_step`` and
    every integer of its ``loops`` state are ints in ``[0, MAX_COUNTER]``.

    Raises:
        CheckpointError: the message names the file, the counter and its value.
    """
    for _ in _walk(content, "checkpoint", path):
        pass
    counters = [(key, content[key]) for key in ("epoch", "global_step") if key in content]
    counters += [
        (key, value)
        for key, value in _walk(content.get("loops"), "loops", path)
        if isinstance(value, int) and not isinstance(value, bool)
    ]
    for key, value in counters:
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise CheckpointError(f"{path}: {key!r} must be an int, got {type(value).__name__}")
        if not 0 <= value <= MAX_COUNTER:
            raise CheckpointError(
                f"{path}: {key!r} is {value}, not a count in [0, {MAX_COUNTER:,}]; the file is "
                f"damaged"
            )


def _walk(value: object, key: str, path: str) -> Iterator[tuple[str, object]]:
    """Every entry of the nested mappings and sequences ``value`` (named from ``key``), a shared
    one each time it is reached.

    Raises:
        CheckpointError: ``value`` nests deeper than :data:`MAX_CONFIG_DEPTH` levels or holds more
            than :data:`MAX_CONFIG_NODES` entries; the message names the file ``path``.
    """
    stack, count = [(key, value, 0)], 0
    while stack:
        key, item, depth = stack.pop()
        count += 1
        if depth > MAX_CONFIG_DEPTH:
            raise CheckpointError(f"{path}: {key} is nested deeper than {MAX_CONFIG_DEPTH} levels")
        if count > MAX_CONFIG_NODES:
            raise CheckpointError(
                f"{path}: {key.split('.')[0].split('[')[0]} holds more than "
                f"{MAX_CONFIG_NODES:,} entries"
            )
        yield key, item
        if isinstance(item, Mapping):
            stack.extend((f"{key}.{name}", child, depth + 1) for name, child in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{key}[{i}]", child, depth + 1) for i, child in enumerate(item))


def check_migration(content: Mapping[str, Any], path: str) -> None:
    """Raise unless Lightning can migrate the checkpoint ``content`` from the version it claims.

    The migration runs on a copy of the containers (the tensors are shared, not copied), which
    :func:`check_counters` bounded.

    Raises:
        CheckpointError: the message names the file, the version and what the migration lacked.
    """
    try:
        migrate_checkpoint(_copy_containers(content))
    except Exception as error:  # Lightning's migrations index the entries of their version
        raise CheckpointError(
            f"{path} claims Lightning {content['pytorch-lightning_version']}, but Lightning cannot "
            f"migrate it from that version ({type(error).__name__}: {_one_line(error)}); the "
            f"file is damaged or of another program"
        ) from None


def _copy_containers(value: Any) -> Any:
    """``value`` with its dicts and lists copied and everything else (tensors) shared."""
    if isinstance(value, Mapping):
        return {key: _copy_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_containers(item) for item in value]
    return value


def check_optimizer_states(model: LightningModule, content: Mapping[str, Any], path: str) -> None:
    """Raise unless every optimizer state of the checkpoint ``content`` loads into an optimizer
    of ``model``'s parameters (as ``fit`` restores them). ``model`` is not modified.

    Raises:
        CheckpointError: a state's parameter groups do not match the model's; the message names
            the file.
    """
    for index, state in enumerate(content.get("optimizer_states", [])):
        probe = torch.optim.SGD(model.parameters(), lr=1.0)
        try:
            probe.load_state_dict(state)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise CheckpointError(
                f"{path}: optimizer state {index} does not fit the model of this config "
                f"({type(error).__name__}: {_one_line(error)}); use the config the checkpoint "
                f"was trained with"
            ) from None


def check_hyper_parameters(
    hyper_parameters: Mapping[str, Any],
    path: str,
    *,
    model: Mapping[str, Any],
    allowed: set[str],
    stored: int,
) -> dict[str, Any]:
    """The checkpoint ``hyper_parameters`` of file ``path`` that ``--ckpt_path`` merges into the
    model config ``model``, checked before anything parses or builds them.

    Args:
        hyper_parameters: the checkpoint's ``hyper_parameters`` entry.
        path: the file, for messages.
        model: the model section of the user's config (what the checkpoint's entries override).
        allowed: the class paths the user's config and command line name: the only ones a
            checkpoint may name (a checkpoint never chooses what is imported).
        stored: the number of values the checkpoint's ``state_dict`` stores; the backbone the
            merged arguments describe must not need more.

    Returns:
        The entries to merge (Lightning's ``_instantiator`` dropped).

    Raises:
        CheckpointError: an entry is not plain data, too deep or too large, names a class the
            user did not name, is no argument of the model or of another type, or describes a
            backbone beyond the package's limits or larger than the stored weights; the message
            names the file and the entry.
    """
    _check_plain_data(hyper_parameters, path, allowed)
    hints = typing.get_type_hints(ImageClassifier.__init__)
    hints.pop("return", None)
    checked = {}
    for key, value in hyper_parameters.items():
        if key in _DROPPED_HYPER_PARAMETERS:
            continue
        if key not in hints:
            raise CheckpointError(
                f"{path}: hyper_parameters has {key!r}, which is no argument of the model "
                f"({', '.join(hints)}); the file is damaged or of another program"
            )
        if not _matches(value, hints[key]):
            raise CheckpointError(
                f"{path}: hyper_parameters {key!r} is {type(value).__name__} {_short(value)}, "
                f"not {_type_name(hints[key])}; the file is damaged"
            )
        checked[key] = value
    _check_backbone(checked, path, model, stored)
    return checked


def _check_plain_data(value: object, path: str, allowed: set[str]) -> None:
    """Raise unless ``value`` is nested plain data within the limits whose ``class_path``
    entries all name a class of ``allowed``."""
    for key, item in _walk(value, "hyper_parameters", path):
        if isinstance(item, Mapping):
            if not all(isinstance(name, str) for name in item):
                raise CheckpointError(f"{path}: {key} has a key that is not a string")
            for name in ("class_path", "_class_path"):
                if name in item and not (isinstance(item[name], str) and item[name] in allowed):
                    raise CheckpointError(
                        f"{path}: {key}.{name} names {_short(item[name])}, a class neither the "
                        f"config nor the command line names; a checkpoint never chooses what is "
                        f"imported: name the class in the config to use it"
                    )
        elif not (item is None or isinstance(item, (bool, int, float, str, list, tuple))):
            raise CheckpointError(
                f"{path}: {key} is of type {type(item).__name__}, not plain data (a number, "
                f"string, list or mapping); the file is damaged"
            )


def _matches(value: object, hint: Any) -> bool:
    """Whether the plain ``value`` is one the type ``hint`` of a model argument accepts (a class
    is given as a mapping with a ``class_path``)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in hint.__args__)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if hint is type(None):
        return value is None
    if hint is float:
        return type(value) in (int, float)
    if hint in (int, str, bool):
        return type(value) is hint
    return isinstance(hint, type) and isinstance(value, Mapping) and "class_path" in value


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("torch.nn.modules.module.", "")


def _short(value: object, length: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= length else f"{text[: length - 3]}..."


def _check_backbone(
    hyper_parameters: Mapping[str, Any], path: str, model: Mapping[str, Any], stored: int
) -> None:
    """Raise unless the named backbone the checkpoint's arguments (over the user's ``model``)
    describe is within the package's limits and needs no more values than the file stores."""
    if not _ARCHITECTURE.intersection(hyper_parameters):
        return  # the user's config alone chooses the backbone; check_fits compares the weights
    merged = {**model, **hyper_parameters}
    name, kwargs = merged.get("backbone"), merged.get("backbone_kwargs") or {}
    if not (isinstance(name, str) and isinstance(kwargs, Mapping)):
        return  # a class of the user's, or a type error the model reports
    num_classes, in_channels = merged.get("num_classes"), merged.get("in_channels")
    num_classes = num_classes if num_classes is not None else 10
    in_channels = in_channels if in_channels is not None else 3
    try:
        check_backbone_size(name, kwargs, num_classes, in_channels)
        least = least_weights(name, kwargs, num_classes)
    except ValueError as error:
        raise CheckpointError(f"{path}: its hyper_parameters describe {error}") from None
    if least > stored:
        raise CheckpointError(
            f"{path}: its hyper_parameters describe a {name} of at least {least:,} weights, but "
            f"the file stores {stored:,} values; they are not the hyper-parameters of its weights"
        )


def stored_values(state_dict: Mapping[str, Any]) -> int:
    """The number of values the tensors of ``state_dict`` hold."""
    return sum(value.numel() for value in state_dict.values() if isinstance(value, torch.Tensor))


def class_paths(config: object) -> set[str]:
    """Every ``class_path`` named in the nested ``config`` (dicts and lists)."""
    found, stack = set(), [config]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if isinstance(item.get("class_path"), str):
                found.add(item["class_path"])
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def check_config_text(text: str, source: str) -> None:
    """Raise unless the YAML or JSON ``text`` nests at most :data:`MAX_CONFIG_DEPTH` levels and
    holds at most :data:`MAX_CONFIG_NODES` values once its aliases are expanded.

    Only the event stream of PyYAML's pure-Python parser is read (nothing is built, no recursion,
    no nesting limit of its own that would stop it first). Quoted and block strings that may
    hold YAML collections are checked too: jsonargparse parses the string given for a value of
    another type.

    Raises:
        ConfigError: the message names ``source`` and the limit.
        yaml.YAMLError: ``text`` is no valid YAML (the events up to the error were checked).
    """
    stack: list[list] = [[0, None]]  # per open collection: expanded values so far, anchor
    anchors: dict[str, int] = {}
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            stack.append([1, event.anchor])
            if len(stack) - 1 > MAX_CONFIG_DEPTH:
                raise ConfigError(
                    f"{source} nests lists and mappings deeper than {MAX_CONFIG_DEPTH} levels"
                )
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            size, anchor = stack.pop()
        elif isinstance(event, yaml.AliasEvent):
            size, anchor = anchors.get(event.anchor, 1), None
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1, event.anchor
            if event.style is not None and _may_nest(event.value):
                _check_value_text(event.value, source)
        else:
            continue
        if anchor is not None:
            anchors[anchor] = size
        stack[-1][0] += size
        if stack[-1][0] > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{source} holds more than {MAX_CONFIG_NODES:,} values once its YAML aliases "
                f"are expanded"
            )


def _check_value_text(text: str, source: str) -> None:
    """:func:`check_config_text` for a value that is read as a string when it is no valid YAML."""
    with contextlib.suppress(yaml.YAMLError):
        check_config_text(text, source)


def _may_nest(text: str) -> bool:
    """Whether ``text``, parsed as YAML, may hold collections or aliases."""
    return any(mark in text for mark in "[{&*\n") or text.lstrip().startswith("- ")


def check_config_arguments(args: Sequence[str]) -> None:
    """Raise unless every config file (``--config``) and every value of the command line
    ``args`` passes :func:`check_config_text`.

    Raises:
        ConfigError: the message names the option or file.
    """
    previous = None
    for arg in args:
        option, _, value = arg.partition("=") if arg.startswith("-") else (previous, "", arg)
        text = _read_config(value) if option in _CONFIG_OPTIONS else None
        if text is not None:
            _check_config_file(text, value)
        elif option in _CONFIG_OPTIONS:
            _check_config_file(value, f"the value of {option}")
        elif value:
            _check_value_text(value, f"the value of {option}" if option else "a command line value")
        previous = arg if arg.startswith("-") and "=" not in arg else None


def _check_config_file(text: str, source: str) -> None:
    """:func:`check_config_text` for a config, which must be valid YAML."""
    try:
        check_config_text(text, source)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML or JSON: {_one_line(error)}") from None


def _read_config(value: str) -> str | None:
    """The text of the config file ``value``; ``None`` when it names no readable file (a config
    string, or a path the parser reports)."""
    try:
        return Path(value).read_text(errors="replace") if Path(value).is_file() else None
    except (OSError, ValueError):
        return None


def _load_config(text: str) -> Any:
    """jsonargparse's YAML loader, behind :func:`check_config_text` (for config files a config
    names, and every value jsonargparse loads; YAML it cannot read is left to that loader)."""
    _check_value_text(text, "a config")
    return get_loader("yaml")(text)


set_loader(_PARSER_MODE, _load_config, exceptions=(yaml.YAMLError,))


def _head(keys: list[str], count: int = 4) -> str:
    return "[" + ", ".join(keys[:count]) + (", ...]" if len(keys) > count else "]")


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def cli(args: Sequence[str] | None = None, *, run: bool = True, **kwargs: object) -> ResodeCLI:
    """Build (and with ``run`` execute) the training CLI on ``args`` (default: ``sys.argv[1:]``).

    ``args`` start with the subcommand when ``run`` is true (``["fit", "--config", ...]``); with
    ``run=False`` they hold only options, and the caller drives ``cli.trainer``.

    Raises:
        ConfigError: a config file or value of ``args`` is nested too deep or too large (see
            :func:`check_config_text`), checked before anything is parsed.
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
            "parser_mode": _PARSER_MODE,
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
        print(f"resode {command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0
