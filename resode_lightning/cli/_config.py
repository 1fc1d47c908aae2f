"""Config files and values (YAML or JSON) bounded before they are parsed.

At most :data:`MAX_CONFIG_DEPTH` levels of nesting and :data:`MAX_CONFIG_NODES` values once YAML
aliases are expanded; the same limits bound a checkpoint's ``hyper_parameters``. Importing this
module registers the parser mode :data:`PARSER_MODE`: jsonargparse's YAML loader behind
:func:`check_config_text`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader

MAX_CONFIG_DEPTH = 64
"""The deepest nesting of lists and mappings a config, a config value or a checkpoint's
``hyper_parameters`` may hold."""
MAX_CONFIG_NODES = 100_000
"""The most values a config (YAML aliases expanded) or a checkpoint's ``hyper_parameters`` may
hold."""
PARSER_MODE = "resode_yaml"
"""The parser mode of the CLI: jsonargparse's YAML loader behind :func:`check_config_text`."""

# the option whose value is a config file (or a config string)
_CONFIG_OPTIONS = ("--config", "-c")


class ConfigError(ValueError):
    """A config file or value nested too deep or too large once its YAML aliases are expanded."""


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
        raise ConfigError(f"{source} is not valid YAML or JSON: {one_line(error)}") from None


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


set_loader(PARSER_MODE, _load_config, exceptions=(yaml.YAMLError,))


def one_line(error: BaseException) -> str:
    """An error's message on one line."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
