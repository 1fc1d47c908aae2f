"""A budget of solver steps per residual stage: one type, one parser, one set of limits.

:func:`~resode_lightning.export_neural_ode`, :func:`~resode_lightning.set_steps`,
:func:`~resode_lightning.resample_depth`, :class:`~resode_lightning.DepthSampling`, saved files
and the command line all read a budget through :func:`steps_per_stage` and :func:`check_steps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

Steps = int | float | Mapping[str, int] | None
"""A budget of solver steps: ``None`` (each stage's depth), an int for every stage, a fraction of
each stage's depth, or ``{stage name: int}`` (stages not named keep theirs)."""
MAX_STEPS = 100_000
"""The most steps (or blocks) a stage may be given anywhere: exports, ``set_steps``,
``resample_depth``, ``DepthSampling``, and the ``checkpoints`` of recursive gradients."""


def check_steps(steps: Steps) -> None:
    """Raise ``ValueError`` unless ``steps`` is a valid budget (``None`` included).

    A budget is ``None`` (each stage's depth), an int in ``[1, MAX_STEPS]`` for every stage, a
    positive fraction of each stage's depth (``0.5``: half), or ``{stage name: int}``.
    """
    if steps is None:
        return
    if isinstance(steps, Mapping):
        for name, count in steps.items():
            if not isinstance(name, str) or not_int(count) or not 1 <= count <= MAX_STEPS:
                raise ValueError(
                    f"steps[{name!r}] must be an int in [1, {MAX_STEPS:,}], got {count!r}"
                )
        return
    if isinstance(steps, int) and not isinstance(steps, bool):
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an int in [1, {MAX_STEPS:,}], got {steps!r}")
        return
    if not isinstance(steps, float) or not 0 < steps <= MAX_STEPS:
        raise ValueError(
            f"steps must be an int in [1, {MAX_STEPS:,}], a positive fraction of each stage's "
            f"depth, or a dict by stage name, got {steps!r}"
        )


def steps_per_stage(
    steps: Steps, depths: Mapping[str, int | None], current: Mapping[str, int]
) -> dict[str, int]:
    """The steps of every stage under the budget ``steps``: the one reading of a budget.

    Args:
        steps: a budget (see :func:`check_steps`).
        depths: ``{stage name: source depth L}`` (``None``: not recorded).
        current: the steps of stages a mapping does not name (and of all stages for ``None``).

    Returns:
        ``{stage name: steps}``; a fraction ``f`` gives ``max(1, ⌊f · L⌋)``: a budget is never
        exceeded (half of 35 blocks is 17 steps).

    Raises:
        ValueError: an invalid budget; a name that is no stage; more than ``MAX_STEPS`` steps;
            a fraction for a stage whose depth is not recorded.
    """
    check_steps(steps)
    if steps is None:
        return dict(current)
    if isinstance(steps, Mapping):
        unknown = sorted(set(steps) - set(depths))
        if unknown:
            raise ValueError(f"steps names unknown stage(s) {unknown}; stages are {list(depths)}")
        return {name: steps.get(name, current[name]) for name in depths}
    if isinstance(steps, int):
        return dict.fromkeys(depths, steps)
    counts = {}
    for name, depth in depths.items():
        if depth is None:
            raise ValueError(
                f"stage {name!r} does not record its source depth (exported by an older "
                f"version): give steps as an int or a dict"
            )
        counts[name] = max(1, math.floor(steps * depth + 1e-9))  # 0.29 * 100 is 28.999…
        if counts[name] > MAX_STEPS:
            raise ValueError(
                f"steps={steps!r} of stage {name!r}'s depth {depth} gives {counts[name]:,} steps, "
                f"more than {MAX_STEPS:,}"
            )
    return counts


def parse_steps(text: str) -> Steps:
    """A budget from command-line text: ``"8"``, ``"0.5"``, ``'{"layer3": 6}'`` or ``"None"``.

    Raises:
        ValueError: anything else, or an invalid budget.
    """
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise ValueError(
            f"steps must be an int, a fraction, a JSON object by stage name or None, got {text!r}"
        )
    check_steps(value)
    return value


def not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
