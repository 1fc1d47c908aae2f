"""Depth resampling: stages rebuilt with another number of blocks.

The weights of the new blocks are read off each stage's weight path (its blocks' parameters
in the ODE parametrisation, interpolated in depth); the model ends in ODE form.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from resode_lightning.core.blocks import set_block_step
from resode_lightning.core.budget import MAX_STEPS, check_steps, not_int
from resode_lightning.core.odeform import convert_stage
from resode_lightning.core.parameters import ode_lifts
from resode_lightning.core.paths import Interpolation, interpolate, knot_times
from resode_lightning.core.stages import MARKER, Stage, find_stages


def blocks_at_depth(
    stage: Stage, steps: int, *, interpolation: Interpolation = "linear"
) -> list[nn.Module]:
    """New blocks running ``stage`` with ``steps`` Euler steps, weights interpolated in depth.

    Parameters and floating buffers (BN running statistics) of block ``j`` are the stage's
    weight path at ``t_j = j * horizon / steps``; the blocks are in ODE form with step
    ``horizon / steps``. With ``steps == L`` they equal the stage's blocks.
    """
    if not_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an int in [1, {MAX_STEPS:,}], got {steps!r}")
    horizon = stage.horizon or 1.0
    blocks = stage.blocks
    if stage.adapter.step_attribute is None and stage.adapter.last_layer(blocks[0]) is None:
        raise ValueError(
            f"stage {stage.name!r}: a {type(blocks[0]).__name__} has no layer ending its branch "
            f"(or an affine=False norm there), so its step cannot be changed; register the block "
            f"with last_layer=... or step_attribute=... to resample it (export_neural_ode works)"
        )
    lifts = ode_lifts(stage)
    states = [block.state_dict() for block in blocks]
    old_times = knot_times(stage.depth, horizon)
    new_times = knot_times(steps, horizon)
    new_states: list[dict[str, Tensor]] = [{} for _ in range(steps)]
    with torch.no_grad():
        for name, value in states[0].items():
            if not value.is_floating_point():
                for state in new_states:
                    state[name] = value.clone()
                continue
            stacked = torch.stack([state[name] for state in states]) * lifts.get(name, 1.0)
            path = interpolate(
                stacked, old_times.to(stacked.device), new_times.to(stacked.device), interpolation
            )
            for state, row in zip(new_states, path):
                state[name] = row
    new_blocks = []
    for state in new_states:
        block = copy.deepcopy(blocks[0])
        block.load_state_dict(state)
        set_block_step(block, stage.adapter, horizon / steps)
        new_blocks.append(block)
    return new_blocks


def replace_blocks(stage: Stage, new_blocks: list[nn.Module]) -> None:
    """Put ``new_blocks`` in place of the stage's blocks in its container, renamed in its
    numbering scheme (see :func:`renamed_children`)."""
    container = stage.container
    names = list(container._modules)
    start, stop = stage.indices[0], stage.indices[-1] + 1
    renamed = renamed_children(stage, names, start, stop, len(new_blocks))
    children = list(container._modules.values())
    children = children[:start] + new_blocks + children[stop:]
    container._modules.clear()
    for name, child in zip(renamed, children):
        container._modules[name] = child
    shift = len(new_blocks) - stage.depth
    later = [
        k
        for k in container._buffers
        if k.startswith(f"{MARKER}_") and int(k.rsplit("_", 1)[1]) > start
    ]
    for key in sorted(later, key=lambda k: int(k.rsplit("_", 1)[1]), reverse=shift > 0):
        container._buffers[f"{MARKER}_{int(key.rsplit('_', 1)[1]) + shift}"] = (
            container._buffers.pop(key)
        )


def renamed_children(
    stage: Stage, names: list[str], start: int, stop: int, count: int
) -> list[str]:
    """Child names after resampling: the run's numbering scheme (``3``, ``b3``, ``block4-3``)
    continued over the new blocks, later children of that scheme shifted, others kept."""
    numbered = [re.fullmatch(r"(.*?)(\d+)", name) for name in names[start:stop]]
    prefixes = {match[1] for match in numbered if match}
    numbers = [int(match[2]) for match in numbered if match]
    consecutive = (
        numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else False
    )
    if len(prefixes) != 1 or len(numbers) != stop - start or not consecutive:
        raise ValueError(
            f"resample_depth needs the blocks of stage {stage.name!r} numbered consecutively "
            f"(0, 1, … or b1, b2, … or block4-0, block4-1, …) to name the new blocks; found "
            f"{names[start:stop]}"
        )
    prefix, first = prefixes.pop(), numbers[0]
    shift = count - (stop - start)

    def later(name: str) -> str:
        match = re.fullmatch(r"(.*?)(\d+)", name)
        if match and match[1] == prefix and int(match[2]) >= first + stop - start:
            return f"{prefix}{int(match[2]) + shift}"
        return name

    renamed = (
        names[:start]
        + [f"{prefix}{first + i}" for i in range(count)]
        + [later(name) for name in names[stop:]]
    )
    if len(set(renamed)) != len(renamed):
        raise ValueError(
            f"resample_depth cannot rename the blocks of stage {stage.name!r} without clashing "
            f"with other children of its container: {names}"
        )
    return renamed


def resample_depth(
    model: nn.Module,
    steps: int | Mapping[str, int],
    *,
    interpolation: Interpolation = "linear",
    inplace: bool = False,
) -> nn.Module:
    """Rebuild residual stages with another number of blocks, weights interpolated in depth.

    Args:
        model: a model with residual stages; plain stages are put in ODE form (horizon 1).
        steps: the new number of blocks, for every stage (an int) or by stage name (a dict;
            stages not named are left as they are).
        interpolation: ``"linear"`` or ``"constant"`` weight path between blocks.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The model in ODE form, each resampled stage with step ``horizon / steps``.
    """
    if isinstance(steps, float):
        raise ValueError(f"resample_depth takes block counts (ints), got the fraction {steps!r}")
    check_steps(steps)
    model = model if inplace else copy.deepcopy(model)
    stages = find_stages(model)
    if isinstance(steps, Mapping):
        unknown = set(steps) - {stage.name for stage in stages}
        if unknown:
            raise ValueError(
                f"unknown stage name(s) {sorted(unknown)}; stages are {[s.name for s in stages]}"
            )
    for stage in reversed(stages):
        convert_stage(stage, 1.0)
        count = steps.get(stage.name) if isinstance(steps, Mapping) else steps
        if count is not None and count != stage.depth:
            replace_blocks(stage, blocks_at_depth(stage, count, interpolation=interpolation))
    return model
