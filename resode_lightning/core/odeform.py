"""ODE form: the lossless rescale of residual stages, its inverse, and depth resampling.

A stage of ``L`` blocks in ODE form computes ``x_{k+1} = P(x_k + h * F_k(x_k))`` with
``h = horizon / L``: the last affine layer of every branch is multiplied by ``1 / h`` and its
output by ``h`` (an :class:`~resode_lightning.core.step.ODEStep` around the layer, or the
block's own step attribute), so the network computes the same function. A persistent buffer on the
stage's container (``layer3.ode_horizon``) records the horizon, travels with the state dict
and makes a strict load into a plain model fail loudly.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from resode_lightning.core.blocks import BlockAdapter, set_block_step
from resode_lightning.core.budget import MAX_STEPS, check_steps, not_int
from resode_lightning.core.paths import Interpolation, interpolate, knot_times
from resode_lightning.core.stages import (
    MARKER,
    Stage,
    find_stages,
    last_layer_name,
    scaled_tensors,
)
from resode_lightning.core.step import named_parameters_by_key


@torch.no_grad()
def _scale_last_layer(block: nn.Module, adapter: BlockAdapter, factor: float) -> None:
    last = adapter.last_layer(block)
    if last is not None:
        for tensor in scaled_tensors(last):
            tensor.mul_(factor)


def convert_stage(stage: Stage, horizon: float, *, rescale: bool = True) -> None:
    """Put one plain stage in ODE form with the given horizon, in place.

    With ``rescale=False`` the weights are taken as ODE-form weights already (a net built to
    be trained in ODE form): only the step and the marker are set.
    """
    if stage.is_ode_form:
        return
    step = horizon / stage.depth
    for block in stage.blocks:
        if rescale:
            _scale_last_layer(block, stage.adapter, 1.0 / step)
        set_block_step(block, stage.adapter, step)
    reference = next(stage.blocks[0].parameters(), None)
    # on the meta device (a layout, no real weights) the marker stays on the host: it is read
    device = reference.device if reference is not None and not reference.is_meta else None
    marker = torch.tensor(float(horizon), dtype=torch.float64, device=device)
    stage.container.register_buffer(stage.marker, marker, persistent=True)


def unconvert_stage(stage: Stage) -> None:
    """Return one ODE-form stage to the plain parametrisation, in place."""
    if not stage.is_ode_form:
        return
    step = stage.step
    for block in stage.blocks:
        _scale_last_layer(block, stage.adapter, step)
        set_block_step(block, stage.adapter, None)
    del stage.container._buffers[stage.marker]


def refresh_steps(model: nn.Module) -> None:
    """Re-install the step of every ODE-form stage of ``model``, in place.

    The step lives in an :class:`~resode_lightning.core.step.ODEStep` around the last layer of
    each branch (torchvision blocks). Transforms that replace layers inside it
    (``SyncBatchNorm.convert_sync_batchnorm``) keep it; code that puts a bare layer in its
    place drops the step. This wraps such layers again and sets every step to the stage's.
    """
    for stage in find_stages(model):
        if stage.is_ode_form:
            for block in stage.blocks:
                set_block_step(block, stage.adapter, stage.step)


def _check_horizon(horizon: float) -> None:
    number = isinstance(horizon, (int, float)) and not isinstance(horizon, bool)
    if not (number and horizon > 0 and horizon != float("inf")):
        raise ValueError(f"horizon must be a positive finite number, got {horizon!r}")


def check_step(horizon: float, stage: Stage) -> None:
    """Raise ``ValueError`` unless ``stage`` can be put in ODE form with ``horizon``.

    The step ``horizon / L`` and the rescale factor ``L / horizon`` must both be normal numbers
    of the dtype of the stage's parameters; otherwise the rescaled weights or the step underflow.
    """
    reference = next((p for p in stage.blocks[0].parameters() if p.is_floating_point()), None)
    dtype = torch.get_default_dtype() if reference is None else reference.dtype
    smallest = torch.finfo(dtype).tiny
    low, high = stage.depth * smallest, stage.depth / smallest
    if not low <= horizon <= high:
        raise ValueError(
            f"horizon {horizon:g} cannot be represented in stage {stage.name!r} ({stage.depth} "
            f"blocks, {dtype}): the step or the rescale factor underflows; use a horizon between "
            f"{low:.3g} and {high:.3g}"
        )


def to_ode_form(model: nn.Module, *, horizon: float = 1.0, inplace: bool = False) -> nn.Module:
    """Rescale every residual stage of ``model`` to ODE form without changing its function.

    Each stage of ``L`` blocks then computes ``x_{k+1} = P(x_k + h F_k(x_k))``, ``h = horizon / L``,
    with the last affine layer of each branch multiplied by ``L / horizon``. State-dict keys are
    unchanged; one marker buffer per stage is added. Stages already in ODE form are left alone.

    Args:
        model: a model with residual stages (torchvision ResNets, ``ode_resnet``, your blocks).
        horizon: the length of the time interval each stage integrates over.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The converted model.

    Example::

        >>> from torchvision.models import resnet50
        >>> ode = to_ode_form(resnet50().eval())
        >>> is_ode_form(ode)
        True
    """
    _check_horizon(horizon)
    model = model if inplace else copy.deepcopy(model)
    stages = find_stages(model)
    for stage in stages:
        check_step(horizon, stage)
    for stage in stages:
        convert_stage(stage, horizon)
    return model


def from_ode_form(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`to_ode_form`: the plain parametrisation, markers removed."""
    model = model if inplace else copy.deepcopy(model)
    for stage in find_stages(model):
        unconvert_stage(stage)
    return model


def is_ode_form(model: nn.Module) -> bool:
    """Whether every residual stage of ``model`` is in ODE form."""
    return all(stage.is_ode_form for stage in find_stages(model))


def ode_scale(stage: Stage) -> dict[str, float]:
    """The block tensors (state-dict names) that count at another scale in the ODE parametrisation.

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


def _module_prefixes(model: nn.Module) -> dict[int, str]:
    return {id(module): f"{name}." if name else "" for name, module in model.named_modules()}


def _rescaled_keys(stage: Stage, container_prefix: str) -> dict[str, float]:
    names = [name for name, _ in stage.container.named_children()]
    keys: dict[str, float] = {}
    for index, block in zip(stage.indices, stage.blocks):
        layer = stage.adapter.last_layer(block)
        last = last_layer_name(block, stage.adapter)
        if layer is None or last is None:
            continue
        prefix = f"{container_prefix}{names[index]}." + (f"{last}." if last else "")
        for attribute in ("weight", "bias"):
            if getattr(layer, attribute, None) is not None:
                keys[f"{prefix}{attribute}"] = 1.0 / stage.step
    return keys


def rescaled_keys(model: nn.Module, stage: Stage) -> dict[str, float]:
    """The tensors the ODE-form rescale of ``stage`` multiplied, by state-dict name in ``model``.

    Returns:
        ``{name: L / horizon}`` for an ODE-form stage of ``model``; ``{}`` for a plain stage.
    """
    if not stage.is_ode_form:
        return {}
    return _rescaled_keys(stage, _module_prefixes(model)[id(stage.container)])


def convert_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], *, prefix: str = ""
) -> dict[str, float]:
    """Put the plain-form entries of ``state_dict`` in the ODE form of ``model``, in place.

    An ODE-form stage of ``model`` whose marker is absent from ``state_dict`` while all its
    rescaled tensors are present is stored plain: those entries are replaced by their values
    times ``L / horizon`` (new tensors; the old ones are not modified) and the model's marker
    is added, so that a strict ``model.load_state_dict(state_dict)`` loads the stored function.
    Other entries are left as they are: stages stored in ODE form keep their own horizon.

    Args:
        model: the model the state dict is meant for, its stages already in ODE form.
        state_dict: a state dict of ``model``, keys starting with ``prefix``.
        prefix: prefix of ``model``'s keys in ``state_dict``.

    Returns:
        ``{name: factor}`` of the entries replaced, names relative to ``model`` (no prefix).
    """
    prefixes = _module_prefixes(model)
    converted: dict[str, float] = {}
    for stage in find_stages(model):
        container = prefixes[id(stage.container)]
        marker = f"{prefix}{container}{stage.marker}"
        if not stage.is_ode_form or marker in state_dict:
            continue
        keys = _rescaled_keys(stage, container)
        if any(f"{prefix}{key}" not in state_dict for key in keys):
            continue
        for key, factor in keys.items():
            state_dict[f"{prefix}{key}"] = state_dict[f"{prefix}{key}"] * factor
        state_dict[marker] = stage.container._buffers[stage.marker].detach().clone()
        converted.update(keys)
    return converted


GRADIENT_ORDERS: dict[type[torch.optim.Optimizer], dict[str, int]] = {
    torch.optim.SGD: {"momentum_buffer": 1},
    torch.optim.Adam: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.AdamW: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.NAdam: {"step": 0, "mu_product": 0, "exp_avg": 1, "exp_avg_sq": 2},
    torch.optim.RAdam: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2},
}
"""Optimizers whose per-parameter state :func:`rescale_optimizer_state` can rescale: for each,
every state key and the power of the gradient it is a running statistic of (0: not scaled).
Types match exactly: a subclass may keep other state under the same keys."""


def rescale_optimizer_state(
    optimizer: torch.optim.Optimizer, factors: Mapping[Tensor, float]
) -> None:
    """Carry the state ``optimizer`` holds for parameters multiplied by a factor, in place.

    A parameter multiplied by ``c`` while computing the same function (the ODE-form rescale,
    ``c = L / horizon``) has gradients ``1 / c`` times the old ones. Each state entry that is a
    running statistic of the ``k``-th power of the gradient (see :data:`GRADIENT_ORDERS`) is
    multiplied by ``c ** -k``: the state the optimizer would hold had it seen the same gradients
    through the new parametrisation. SGD's momentum and Adam's first moment are divided by ``c``,
    Adam's second moments by ``c ** 2``, step counts are kept. L2 weight decay added to the
    gradient is carried with it, as a gradient. Parameters without state are left alone.

    Args:
        optimizer: the optimizer holding state for some of the parameters.
        factors: ``{parameter: c}`` for the parameters that were multiplied.

    Raises:
        ValueError: the optimizer holds state for one of the parameters, but its type or a state
            key is not in :data:`GRADIENT_ORDERS`; nothing is modified.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p in factors]
    stateful = [p for p in params if optimizer.state.get(p)]
    if not stateful:
        return
    orders = GRADIENT_ORDERS.get(type(optimizer))
    unknown = sorted({key for p in stateful for key in optimizer.state[p]} - set(orders or {}))
    if orders is None or unknown:
        raise ValueError(
            f"cannot rescale the state {type(optimizer).__name__} holds for {len(stateful)} "
            f"rescaled parameter(s): unknown state key(s) {unknown} (the state of "
            f"{', '.join(cls.__name__ for cls in GRADIENT_ORDERS)} can be rescaled)"
        )
    with torch.no_grad():
        for p in stateful:
            for key, value in optimizer.state[p].items():
                if orders[key] and isinstance(value, Tensor):
                    value.mul_(factors[p] ** -orders[key])


def stage_tensors(stage: Stage) -> tuple[dict[str, list[Tensor]], dict[str, float]]:
    """The live parameter tensors of a stage's blocks, by name, and their ODE-form factors.

    Returns:
        ``({name: [block_1's tensor, …, block_L's tensor]}, {name: factor})``, names as in
        the blocks' state dicts (``bn2.weight`` also in ODE form); the tensors
        are the blocks' own parameters (not copies), so the lists stay valid while training
        updates them in place; ``factor`` is the scale at which a tensor counts in the ODE
        parametrisation (see :func:`resode_lightning.core.odeform.ode_scale`), 1 when absent.
    """
    per_block = [named_parameters_by_key(block) for block in stage.blocks]
    tensors = {name: [params[name] for params in per_block] for name in per_block[0]}
    return tensors, ode_scale(stage)


def stage_parameters(stage: Stage) -> dict[str, Tensor]:
    """The block parameters of ``stage`` stacked over depth, in the ODE parametrisation.

    Returns:
        ``{name: tensor of shape (L, *param_shape)}``, detached, on the parameters' device.
    """
    tensors, factors = stage_tensors(stage)
    with torch.no_grad():
        return {
            name: torch.stack(values) * factors.get(name, 1.0) for name, values in tensors.items()
        }


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
    factors = ode_scale(stage)
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
            stacked = torch.stack([state[name] for state in states]) * factors.get(name, 1.0)
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


def _replace_blocks(stage: Stage, new_blocks: list[nn.Module]) -> None:
    container = stage.container
    names = list(container._modules)
    start, stop = stage.indices[0], stage.indices[-1] + 1
    renamed = _renamed_children(stage, names, start, stop, len(new_blocks))
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


def _renamed_children(
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
            _replace_blocks(stage, blocks_at_depth(stage, count, interpolation=interpolation))
    return model


def unconvert_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    *,
    prefix: str = "",
    markers: Collection[str] | None = None,
) -> dict[str, float]:
    """Put the ODE-form entries of ``state_dict`` in the plain form, in place.

    The inverse of :func:`convert_state_dict`: for each stage of ``model`` (in either form)
    whose marker is in ``state_dict`` and whose rescaled tensors all are, those entries are
    replaced by their values times ``horizon / L`` (``horizon`` read from the marker; new
    tensors, the old ones are not modified) and the marker is removed, so that a strict
    ``load_state_dict`` into the plain model loads the stored function.

    Args:
        model: a model of the state dict's architecture (its own form does not matter).
        state_dict: a state dict of ``model``, keys starting with ``prefix``.
        prefix: prefix of ``model``'s keys in ``state_dict``.
        markers: only the stages whose marker keys (relative to ``model``, e.g.
            ``layer1.ode_horizon``) are in this collection; all stages when ``None``.

    Returns:
        ``{name: L / horizon}`` of the entries replaced (each was divided by its factor), names
        relative to ``model``.

    Raises:
        ValueError: a marker is not a scalar holding a finite positive horizon.
    """
    prefixes = _module_prefixes(model)
    converted: dict[str, float] = {}
    for stage in find_stages(model):
        container = prefixes[id(stage.container)]
        name = f"{container}{stage.marker}"
        marker = f"{prefix}{name}"
        if marker not in state_dict or (markers is not None and name not in markers):
            continue
        value = state_dict[marker]
        horizon = float(value) if isinstance(value, Tensor) and value.numel() == 1 else None
        if horizon is None or not 0 < horizon < float("inf"):
            raise ValueError(f"marker {marker!r} must hold a finite positive horizon: {value!r}")
        keys = list(_rescaled_keys(stage, container))
        if any(f"{prefix}{key}" not in state_dict for key in keys):
            continue
        step = horizon / stage.depth
        for key in keys:
            state_dict[f"{prefix}{key}"] = state_dict[f"{prefix}{key}"] * step
            converted[key] = 1.0 / step
        del state_dict[marker]
    return converted
