"""The checkpoint state of :class:`~resode_lightning.DepthGrowth`, checked field by field."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

STATE_VERSION = 1
"""Version of the state :class:`DepthGrowth` records in checkpoints."""


def check_state(
    state: object,
    *,
    fractions: Sequence[float],
    targets: list[int],
    stage_depths: Callable[[int], list[int]],
) -> dict[str, Any]:
    """A checkpoint state of :class:`DepthGrowth`, checked against its settings (``fractions``
    of each stage's depth, the ``targets`` the module was built at, and the depths of each
    level) before anything is rebuilt from it.

    Raises:
        ValueError: a field is missing, of another type or out of range; the message names it.
    """
    expected = [
        "checked_epoch",
        "depths",
        "growths",
        "level",
        "readings",
        "stages",
        "targets",
        "version",
    ]
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    if keys != expected:
        raise ValueError(f"DepthGrowth: a checkpoint state holds {expected}, got {keys!r}")
    if state["version"] != STATE_VERSION:
        raise ValueError(
            f"DepthGrowth: checkpoint state version {state['version']!r}, this version "
            f"reads {STATE_VERSION}"
        )
    if state["targets"] != targets:
        raise ValueError(
            f"DepthGrowth: the checkpoint grows its stages to {state['targets']!r} blocks, "
            f"but the module was built with {targets}: build it at the depths of the "
            f"run that wrote the checkpoint"
        )
    level = state["level"]
    if not is_index(level) or level >= len(fractions):
        raise ValueError(
            f"DepthGrowth: checkpoint 'level' must be an int in [0, {len(fractions) - 1}] "
            f"(one per fraction of depths={fractions}), got {level!r}"
        )
    if state["depths"] != stage_depths(level):
        raise ValueError(
            f"DepthGrowth: the checkpoint holds stages of {state['depths']!r} blocks at "
            f"level {level}, but depths={fractions} gives {stage_depths(level)}: "
            f"resume with the DepthGrowth settings of the run that wrote it"
        )
    checked = state["checked_epoch"]
    if not (is_index(checked) or checked == -1):
        raise ValueError(
            f"DepthGrowth: checkpoint 'checked_epoch' must be an int >= -1, got {checked!r}"
        )
    readings = state["readings"]
    if readings is not None and not (
        isinstance(readings, list)
        and len(readings) == len(targets)
        and all(is_number(r) for r in readings)
    ):
        raise ValueError(
            f"DepthGrowth: checkpoint 'readings' must be None or one number per stage, got "
            f"{readings!r}"
        )
    growths = state["growths"]
    if not isinstance(growths, list) or not all(is_record(r) for r in growths):
        raise ValueError(
            "DepthGrowth: checkpoint 'growths' must be a list of growth records (epoch, "
            "step, depths, errors, output_error)"
        )
    return state


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_epoch(value: object) -> bool:
    if isinstance(value, float):
        return 0 < value < 1
    return is_index(value) and value >= 1


def is_record(record: object) -> bool:
    """Whether ``record`` is a growth record (:attr:`DepthGrowth.growths`)."""
    if not isinstance(record, dict) or sorted(record) != [
        "depths",
        "epoch",
        "errors",
        "output_error",
        "step",
    ]:
        return False
    depths, errors, output = record["depths"], record["errors"], record["output_error"]
    return (
        is_index(record["epoch"])
        and is_index(record["step"])
        and isinstance(depths, dict)
        and all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(map(is_index, v))
            for k, v in depths.items()
        )
        and isinstance(errors, dict)
        and all(isinstance(k, str) and is_number(v) for k, v in errors.items())
        and (output is None or is_number(output))
    )
