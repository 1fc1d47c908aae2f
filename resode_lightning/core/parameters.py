"""A stage's block parameters as the metrics and depth resampling read them: in the ODE
parametrisation.

A plain stage's tensors that hold the gain in ODE form count at their **lift** ``L`` (horizon
1) times their value there (see :mod:`~resode_lightning.core.odeform`); an ODE-form stage's
tensors count as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resode_lightning.core.stages import Stage, last_layer_name
from resode_lightning.core.step import named_parameters_by_key


def ode_lifts(stage: Stage) -> dict[str, float]:
    """The lift of each block tensor (state-dict names) that counts at another value in the
    ODE parametrisation.

    The last affine layer of a plain stage counts at ``L`` times its value (horizon 1); every
    tensor not in the returned dict, and every tensor of an ODE-form stage, counts as it is.
    """
    if stage.is_ode_form:
        return {}
    last = last_layer_name(stage.blocks[0], stage.adapter)
    if last is None:
        return {}
    prefix = f"{last}." if last else ""
    return {f"{prefix}weight": 1.0 / stage.step, f"{prefix}bias": 1.0 / stage.step}


def stage_tensors(stage: Stage) -> tuple[dict[str, list[Tensor]], dict[str, float]]:
    """The live parameter tensors of a stage's blocks, by name, and their lifts.

    Returns:
        ``({name: [block_1's tensor, …, block_L's tensor]}, {name: lift})``, names as in
        the blocks' state dicts (``bn2.weight`` also in ODE form); the tensors
        are the blocks' own parameters (not copies), so the lists stay valid while training
        updates them in place; the lifts are :func:`ode_lifts` (1 when absent).
    """
    per_block = [named_parameters_by_key(block) for block in stage.blocks]
    tensors = {name: [params[name] for params in per_block] for name in per_block[0]}
    return tensors, ode_lifts(stage)


def stage_parameters(stage: Stage) -> dict[str, Tensor]:
    """The block parameters of ``stage`` stacked over depth, in the ODE parametrisation.

    Returns:
        ``{name: tensor of shape (L, *param_shape)}``, detached, on the parameters' device.
    """
    tensors, lifts = stage_tensors(stage)
    with torch.no_grad():
        return {
            name: torch.stack(values) * lifts.get(name, 1.0) for name, values in tensors.items()
        }
