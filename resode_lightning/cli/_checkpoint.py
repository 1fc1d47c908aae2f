"""``--ckpt_path`` checked before Lightning reads it.

The file is read once by the package's safe reader (nothing in it is executed) and must hold
what the subcommand restores; its counters, Lightning version, optimizer states and weights are
checked against the model of the config, and its ``hyper_parameters`` never choose what is
imported: a ``class_path`` in them must be one the config or command line names.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.version import InvalidVersion, Version
from pytorch_lightning import LightningModule
from pytorch_lightning.utilities.migration import migrate_checkpoint

from resode_lightning.cli._config import MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, one_line
from resode_lightning.core.io.checkpoint import safe_torch_load, state_dict_in
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.lit.classifier import ImageClassifier, check_backbone_size, least_weights

# the loop state each subcommand restores from a checkpoint
_LOOPS = {
    "fit": "fit_loop",
    "validate": "validate_loop",
    "test": "test_loop",
    "predict": "predict_loop",
}
MAX_COUNTER = 2**31 - 1
"""The largest epoch, step or loop counter a checkpoint may hold."""
# checkpoint hyper-parameters that name no argument of the model and are dropped, as Lightning does
_DROPPED_HYPER_PARAMETERS = ("_instantiator",)
# the model arguments that choose the backbone's architecture and size
_ARCHITECTURE = frozenset({"backbone", "backbone_kwargs", "num_classes", "in_channels"})


def read_checkpoint(path: str | Path, subcommand: str) -> dict[str, Any]:
    """The content of the Lightning checkpoint ``path`` for ``resode <subcommand> --ckpt_path``.

    The file is read once, by :func:`~resode_lightning.core.io.checkpoint.safe_torch_load`
    (nothing in it is executed), and must hold a state dict as
    :func:`~resode_lightning.load_state_dict_file` reads one and what ``subcommand`` restores:
    the weights, and for ``fit`` the optimizer and scheduler states.

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
    content = safe_torch_load(text)
    state_dict_in(content, Path(text))  # refused unless it holds a state dict of named tensors
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
            f"{path} does not fit the model of this config: {one_line(error)}; use the config "
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
    """Raise unless the checkpoint ``content`` is nested at most
    :data:`~resode_lightning.cli._config.MAX_CONFIG_DEPTH` levels deep with at most
    :data:`~resode_lightning.cli._config.MAX_CONFIG_NODES` entries, and its ``epoch``,
    ``global_step`` and every integer of its ``loops`` state are ints in ``[0, MAX_COUNTER]``.

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
        CheckpointError: ``value`` nests deeper than the config limits allow
            (:mod:`~resode_lightning.cli._config`); the message names the file ``path``.
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
            f"migrate it from that version ({type(error).__name__}: {one_line(error)}); the "
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
                f"({type(error).__name__}: {one_line(error)}); use the config the checkpoint "
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


def _head(keys: list[str], count: int = 4) -> str:
    return "[" + ", ".join(keys[:count]) + (", ...]" if len(keys) > count else "]")
