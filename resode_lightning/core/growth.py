"""Depth growth: stages rebuilt at another depth with their weight path, and what an optimizer
carries across.

Block ``k`` of a stage of ``L`` blocks is the knot ``t_k = k T / L`` of the stage's weight path
(``docs/theory.md``, "Weight paths"). Growing the stage to ``L'`` blocks reads the new blocks off
that path at ``t'_j = j T / L'``: in stored values, ``θ'_j = scale · Σ_k W[j, k] θ_k`` with ``W``
the interpolation weights. ``scale`` is 1 for an ODE-form stage (the step ``T / L'`` lives in
the block, not in its weights) and for every tensor but the last layer's in a plain stage, whose
stored weight and bias hold the step: their ``scale`` is ``L / L'``. When ``L'`` is a multiple of
``L`` the path is kept exactly; the network's function changes by the Euler scheme's own error
(``L'`` steps of the path instead of ``L``), measured on a probe.

An optimizer's running statistics of the gradients are carried the way the gradients go: a block
of the deeper stage takes the step ``T / L'`` instead of ``T / L``, so its gradient is about
``(L / L') / scale`` times the old gradients interpolated at its time (Σ of the new blocks'
gradients over one old step equals the old block's). A statistic of the ``k``-th power of the
gradient is interpolated with ``W`` and multiplied by that factor to the power ``k``
(:data:`~resode_lightning.core.optimizer_state.GRADIENT_ORDERS`); step counts are copied.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resode_lightning.core.budget import MAX_STEPS, not_int
from resode_lightning.core.odeform import convert_stage, unconvert_stage
from resode_lightning.core.optimizer_state import GRADIENT_ORDERS
from resode_lightning.core.parameters import ode_lifts
from resode_lightning.core.paths import INTERPOLATIONS, Interpolation, interpolate, knot_times
from resode_lightning.core.resample import blocks_at_depth, renamed_children, replace_blocks
from resode_lightning.core.stages import Stage, find_stages, run_stage
from resode_lightning.core.step import named_parameters_by_key
from resode_lightning.core.watch import stage_inputs


@dataclass(frozen=True, eq=False)
class GrownTensor:
    """One block tensor of a stage across a depth change.

    Attributes:
        stage: the stage's name after the change.
        name: the tensor's name in a block's state dict (``conv1.weight``, ``bn2.bias``).
        old: the old blocks' parameters, in depth order.
        new: the new blocks' parameters, in depth order.
        weights: ``W``, shape ``(len(new), len(old))``, float64: the interpolation weights
            (each row sums to 1).
        scale: ``new[j] = scale * Σ_k W[j, k] * old[k]`` (stored values).
        gradient_scale: the gradient of ``new[j]`` is about ``gradient_scale`` times the old
            gradients interpolated with ``W``.
    """

    stage: str
    name: str
    old: tuple[nn.Parameter, ...]
    new: tuple[nn.Parameter, ...]
    weights: Tensor
    scale: float
    gradient_scale: float


@dataclass(frozen=True)
class DepthChange:
    """What :func:`grow_depth` did.

    Attributes:
        depths: ``{stage name: (old depth, new depth)}`` of the stages it rebuilt.
        tensors: every block parameter of those stages, old and new (:class:`GrownTensor`), in
            the blocks' parameter order.
        errors: ``{stage name: ||y' - y|| / ||y||}``: each rebuilt stage's output on the
            probe's input to that stage, new blocks against old (eval mode); empty without a
            probe or for a stage the probe's forward pass does not reach.
        output_error: the same for the model's output (``None`` without a probe, or when the
            model does not return a tensor).
    """

    depths: dict[str, tuple[int, int]]
    tensors: tuple[GrownTensor, ...]
    errors: dict[str, float]
    output_error: float | None


def grow_depth(
    model: nn.Module,
    depths: Mapping[str, int],
    *,
    interpolation: Interpolation = "linear",
    probe: Tensor | None = None,
) -> DepthChange:
    """Rebuild stages of ``model`` with other numbers of blocks, in place, each keeping its form.

    The new blocks are read off each stage's weight path (module docstring): parameters and
    floating buffers (BatchNorm running statistics) interpolated in depth, the step of an
    ODE-form stage set to ``horizon / L'``, a plain stage left plain with its last layer's
    weight and bias holding the new step. Stages not named, and those named with their own
    depth, are left as they are. Shrinking works the same way.

    Args:
        model: a model with residual stages.
        depths: ``{stage name: new number of blocks}`` (at least 2: one block is no stage).
        interpolation: ``"linear"`` or ``"constant"`` weight path between blocks.
        probe: an input of ``model``; when given, each rebuilt stage's output and the model's
            are compared before and after, in eval mode (training flags restored).

    Returns:
        The :class:`DepthChange`: the parameters' correspondence, for
        :func:`carry_optimizer_state`, and the errors measured on the probe.

    Raises:
        ValueError: an unknown stage name, a depth that is not an int in ``[2, MAX_STEPS]``, an
            interpolation other than those above, a stage whose step cannot be changed, or
            blocks not numbered consecutively (the new ones could not be named); the model is
            left as it was.

    Example::

        >>> from resode_lightning.core.models import ode_resnet
        >>> model = ode_resnet(depths=(4,), widths=(8,), init="smooth", seed=0)
        >>> change = grow_depth(model, {"stages.0": 8}, probe=torch.randn(2, 3, 16, 16))
        >>> change.depths, len(model.stages[0])
        ({'stages.0': (4, 8)}, 8)
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    stages = find_stages(model)
    names = [stage.name for stage in stages]
    unknown = sorted(set(depths) - set(names))
    if unknown:
        raise ValueError(f"unknown stage name(s) {unknown}; stages are {names}")
    for name, depth in depths.items():
        if not_int(depth) or not 2 <= depth <= MAX_STEPS:
            raise ValueError(
                f"depths[{name!r}] must be an int in [2, {MAX_STEPS:,}] (a stage has at least 2 "
                f"blocks), got {depth!r}"
            )
    changed = [s for s in stages if s.name in depths and depths[s.name] != s.depth]
    for stage in changed:  # every stage checked before anything is replaced
        children = list(stage.container._modules)
        start, stop = stage.indices[0], stage.indices[-1] + 1
        renamed_children(stage, children, start, stop, depths[stage.name])
    built = [blocks_at_depth(s, depths[s.name], interpolation=interpolation) for s in changed]
    inputs: dict[str, Tensor] = {}
    before: dict[str, Tensor] = {}
    output = None
    if probe is not None:
        with _evaluating(model), torch.no_grad():
            inputs = stage_inputs(model, changed, probe)
            before = {s.name: run_stage(s, inputs[s.name]) for s in changed if s.name in inputs}
            output = model(probe)
    old_params = [[named_parameters_by_key(block) for block in s.blocks] for s in changed]
    lifts = [ode_lifts(s) for s in changed]
    plain = [not s.is_ode_form for s in changed]
    horizons = [s.horizon or 1.0 for s in changed]
    old_depths = [s.depth for s in changed]
    for stage, blocks, is_plain in zip(reversed(changed), reversed(built), reversed(plain)):
        if is_plain:  # the new blocks hold ODE-form weights: the last layer takes the step back
            holder = Stage(
                stage.name, nn.Sequential(*blocks), list(range(len(blocks))), stage.adapter, "h"
            )
            convert_stage(holder, 1.0, rescale=False)
            unconvert_stage(holder)
        replace_blocks(stage, blocks)  # later runs of a container first: earlier indices hold
    found = {id(s.blocks[0]): s for s in find_stages(model)}
    new_stages = [found[id(blocks[0])] for blocks in built]
    tensors = []
    for i, new in enumerate(new_stages):
        weights = interpolate(
            torch.eye(old_depths[i], dtype=torch.float64),
            knot_times(old_depths[i], horizons[i]),
            knot_times(new.depth, horizons[i]),
            interpolation,
        )
        new_params = [named_parameters_by_key(block) for block in new.blocks]
        for name in old_params[i][0]:
            scale = old_depths[i] / new.depth if plain[i] and name in lifts[i] else 1.0
            tensors.append(
                GrownTensor(
                    stage=new.name,
                    name=name,
                    old=tuple(params[name] for params in old_params[i]),
                    new=tuple(params[name] for params in new_params),
                    weights=weights,
                    scale=scale,
                    gradient_scale=old_depths[i] / new.depth / scale,
                )
            )
    errors: dict[str, float] = {}
    output_error = None
    if probe is not None:
        with _evaluating(model), torch.no_grad():
            for old, new in zip(changed, new_stages):
                if old.name in before:
                    errors[new.name] = _relative(run_stage(new, inputs[old.name]), before[old.name])
            after = model(probe)
        if isinstance(output, Tensor) and isinstance(after, Tensor):
            output_error = _relative(after, output)
    return DepthChange(
        depths={new.name: (depth, new.depth) for depth, new in zip(old_depths, new_stages)},
        tensors=tuple(tensors),
        errors=errors,
        output_error=output_error,
    )


def carry_optimizer_state(optimizer: torch.optim.Optimizer, change: DepthChange) -> None:
    """Put the new parameters of ``change`` in the place of the old ones in ``optimizer``, in
    place, with their state.

    In every param group holding a stage's old parameters, they are replaced by the new ones, in
    the blocks' order, where the stage's first one was: a group built from the model's
    parameters in module order is the group the optimizer would build from the grown model
    (checkpoints index the state by that order), and the group dicts themselves are kept, so
    learning-rate schedulers go on working. The state of each new parameter is interpolated
    from the old ones' and rescaled (module docstring); parameters without state get none.

    Args:
        optimizer: an optimizer holding some of the old parameters.
        change: what :func:`grow_depth` returned.

    Raises:
        ValueError: a stage tensor's blocks are split across param groups (or only some of them
            are in the optimizer), or the optimizer holds state for an old parameter but its
            type or a state key is not in
            :data:`~resode_lightning.core.optimizer_state.GRADIENT_ORDERS`; nothing is modified.
    """
    group_of: dict[Tensor, int] = {}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[p] = index
    held: dict[GrownTensor, int] = {}
    for tensor in change.tensors:
        groups = {group_of.get(p) for p in tensor.old}
        if len(groups) > 1:
            raise ValueError(
                f"the optimizer holds the {tensor.name} of stage {tensor.stage!r}'s blocks in "
                f"{'different param groups' if None not in groups else 'part only'}: a stage "
                f"that changes depth has its blocks' tensors all in one group (or none)"
            )
        if groups != {None}:
            held[tensor] = groups.pop()
    stateful = [p for tensor in held for p in tensor.old if optimizer.state.get(p)]
    orders = GRADIENT_ORDERS.get(type(optimizer), {})
    unknown = sorted({key for p in stateful for key in optimizer.state[p]} - set(orders))
    if stateful and (type(optimizer) not in GRADIENT_ORDERS or unknown):
        raise ValueError(
            f"cannot carry the state {type(optimizer).__name__} holds for the blocks of a stage "
            f"that changes depth: unknown state key(s) {unknown} (the state of "
            f"{', '.join(cls.__name__ for cls in GRADIENT_ORDERS)} can be carried)"
        )
    states = {tensor: _new_states(optimizer, tensor, orders) for tensor in held}
    for index, group in enumerate(optimizer.param_groups):
        mine = [tensor for tensor in held if held[tensor] == index]
        stage_of = {p: tensor.stage for tensor in mine for p in tensor.old}
        if not stage_of:
            continue
        placed: set[str] = set()
        params: list[Tensor] = []
        for p in group["params"]:
            stage = stage_of.get(p)
            if stage is None:
                params.append(p)
            elif stage not in placed:
                placed.add(stage)
                ours = [tensor for tensor in mine if tensor.stage == stage]
                params += [tensor.new[j] for j in range(len(ours[0].new)) for tensor in ours]
        group["params"][:] = params
    for tensor, new_states in states.items():
        for p in tensor.old:
            optimizer.state.pop(p, None)
        for p, state in zip(tensor.new, new_states):
            if state:
                optimizer.state[p] = state


def _new_states(
    optimizer: torch.optim.Optimizer, tensor: GrownTensor, orders: Mapping[str, int]
) -> list[dict[str, object]]:
    """The state of each new parameter of ``tensor``: statistics of the ``k``-th power of the
    gradient interpolated and multiplied by ``gradient_scale ** k``, counts copied from the
    nearest old block."""
    old = [optimizer.state.get(p) or {} for p in tensor.old]
    keys = list(dict.fromkeys(key for state in old for key in state))
    states: list[dict[str, object]] = []
    with torch.no_grad():
        for row in tensor.weights.tolist():
            nearest = max(range(len(row)), key=row.__getitem__)
            new: dict[str, object] = {}
            for key in keys:
                order = orders[key]
                present = [(w, state[key]) for w, state in zip(row, old) if key in state]
                if order == 0 or not all(isinstance(v, Tensor) for _, v in present):
                    value = old[nearest][key] if key in old[nearest] else present[0][1]
                    new[key] = value.clone() if isinstance(value, Tensor) else value
                    continue
                total = sum((w * v for w, v in present if w), torch.zeros_like(present[0][1]))
                new[key] = total * tensor.gradient_scale**order
            states.append(new)
    return states


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, every module's training flag restored on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _relative(new: Tensor, old: Tensor) -> float:
    """``||new - old|| / ||old||`` as a Python number (``||new||`` when ``old`` is 0)."""
    difference = (new.float() - old.float()).norm()
    reference = old.float().norm()
    return float(difference / reference if reference > 0 else difference)
