"""ODE form: the lossless rescale of residual stages, its inverse, and loading in either form.

A stage of ``L`` blocks in ODE form computes ``x_{k+1} = P(x_k + h * F_k(x_k))`` with
``h = horizon / L``: the last affine layer of every branch is multiplied by ``1 / h`` and its
output by ``h`` (an :class:`~resode_lightning.core.step.ODEStep` around the layer, or the
block's own step attribute), so the network computes the same function. A persistent buffer on
the stage's container (``layer3.ode_horizon``) records the horizon, travels with the state dict
and makes a strict load into a plain model fail loudly; :func:`load_into` reads it.

The factor ``L / horizon`` has one name on each side of the rescale:

- the **gain** of an ODE-form stage: what the rescale multiplied the weight and bias of each
  branch's last layer by, so the stored tensors hold it (:func:`gains`);
- the **lift** of a plain stage: the factor at which those tensors count in the ODE
  parametrisation, which the stored tensors lack
  (:func:`~resode_lightning.core.parameters.ode_lifts`).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from resode_lightning.core.blocks import BlockAdapter, set_block_step
from resode_lightning.core.io.checkpoint import check_keys
from resode_lightning.core.io.errors import CheckpointError, reason
from resode_lightning.core.stages import MARKER, Stage, find_stages, last_layer_name


def _gain_tensors(layer: nn.Module) -> list[Tensor]:
    """The tensors of ``layer`` that hold the gain in ODE form: its affine weight and bias."""
    return [
        t for t in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if t is not None
    ]


@torch.no_grad()
def _multiply_last_layer(block: nn.Module, adapter: BlockAdapter, factor: float) -> None:
    last = adapter.last_layer(block)
    if last is not None:
        for tensor in _gain_tensors(last):
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
            _multiply_last_layer(block, stage.adapter, 1.0 / step)
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
        _multiply_last_layer(block, stage.adapter, step)
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

    The step ``horizon / L`` and the gain ``L / horizon`` must both be normal numbers
    of the dtype of the stage's parameters; otherwise the rescaled weights or the step underflow.
    """
    reference = next((p for p in stage.blocks[0].parameters() if p.is_floating_point()), None)
    dtype = torch.get_default_dtype() if reference is None else reference.dtype
    smallest = torch.finfo(dtype).tiny
    low, high = stage.depth * smallest, stage.depth / smallest
    if not low <= horizon <= high:
        raise ValueError(
            f"horizon {horizon:g} cannot be represented in stage {stage.name!r} ({stage.depth} "
            f"blocks, {dtype}): the step or the gain underflows; use a horizon between "
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


def _module_prefixes(model: nn.Module) -> dict[int, str]:
    """The state-dict prefix (``layer1.``) of every submodule of ``model``, by ``id``."""
    return {id(module): f"{name}." if name else "" for name, module in model.named_modules()}


def _gains(stage: Stage, container_prefix: str) -> dict[str, float]:
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


def gains(model: nn.Module, stage: Stage) -> dict[str, float]:
    """The tensors that hold the gain of ``stage`` (see above), by state-dict name in ``model``.

    Returns:
        ``{name: L / horizon}`` for an ODE-form stage of ``model``; ``{}`` for a plain stage.
    """
    if not stage.is_ode_form:
        return {}
    return _gains(stage, _module_prefixes(model)[id(stage.container)])


def convert_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], *, prefix: str = ""
) -> dict[str, float]:
    """Put the plain-form entries of ``state_dict`` in the ODE form of ``model``, in place.

    An ODE-form stage of ``model`` whose marker is absent from ``state_dict`` while all the
    tensors that hold its gain are present is stored plain: those entries are replaced by their
    values times the gain (new tensors; the old ones are not modified) and the model's marker
    is added, so that a strict ``model.load_state_dict(state_dict)`` loads the stored function.
    Other entries are left as they are: stages stored in ODE form keep their own horizon.

    Args:
        model: the model the state dict is meant for, its stages already in ODE form.
        state_dict: a state dict of ``model``, keys starting with ``prefix``.
        prefix: prefix of ``model``'s keys in ``state_dict``.

    Returns:
        ``{name: gain}`` of the entries replaced, names relative to ``model`` (no prefix).
    """
    prefixes = _module_prefixes(model)
    converted: dict[str, float] = {}
    for stage in find_stages(model):
        container = prefixes[id(stage.container)]
        marker = f"{prefix}{container}{stage.marker}"
        if not stage.is_ode_form or marker in state_dict:
            continue
        keys = _gains(stage, container)
        if any(f"{prefix}{key}" not in state_dict for key in keys):
            continue
        for key, gain in keys.items():
            state_dict[f"{prefix}{key}"] = state_dict[f"{prefix}{key}"] * gain
        state_dict[marker] = stage.container._buffers[stage.marker].detach().clone()
        converted.update(keys)
    return converted


def unconvert_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    *,
    prefix: str = "",
    markers: Collection[str] | None = None,
) -> dict[str, float]:
    """Put the ODE-form entries of ``state_dict`` in the plain form, in place.

    The inverse of :func:`convert_state_dict`: for each stage of ``model`` (in either form)
    whose marker is in ``state_dict`` and whose gain-holding tensors all are, those entries are
    divided by the gain ``L / horizon`` (``horizon`` read from the marker; new tensors, the old
    ones are not modified) and the marker is removed, so that a strict ``load_state_dict`` into
    the plain model loads the stored function.

    Args:
        model: a model of the state dict's architecture (its own form does not matter).
        state_dict: a state dict of ``model``, keys starting with ``prefix``.
        prefix: prefix of ``model``'s keys in ``state_dict``.
        markers: only the stages whose marker keys (relative to ``model``, e.g.
            ``layer1.ode_horizon``) are in this collection; all stages when ``None``.

    Returns:
        ``{name: gain}`` of the entries replaced (each was divided by its gain), names
        relative to ``model``.

    Raises:
        CheckpointError: a marker is not a scalar holding a finite positive horizon its stage
            can use.
    """
    prefixes = _module_prefixes(model)
    converted: dict[str, float] = {}
    for stage in find_stages(model):
        container = prefixes[id(stage.container)]
        name = f"{container}{stage.marker}"
        marker = f"{prefix}{name}"
        if marker not in state_dict or (markers is not None and name not in markers):
            continue
        step = _marker_horizon(marker, state_dict[marker], stage) / stage.depth
        keys = list(_gains(stage, container))
        if any(f"{prefix}{key}" not in state_dict for key in keys):
            continue
        for key in keys:
            state_dict[f"{prefix}{key}"] = state_dict[f"{prefix}{key}"] * step
            converted[key] = 1.0 / step
        del state_dict[marker]
    return converted


def strip_prefix(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Drop the module prefix (``model.``, ``module.``, ...) that best matches ``model``'s keys.

    The prefix is the one under which most keys name a key of ``model`` (or a stage marker);
    the shortest wins a tie. Only a key's last parts are tried, as many as the longest name
    has: time grows linearly with the number of keys.

    Raises:
        CheckpointError: a key is not a string.
    """
    check_keys(state_dict, "the state dict")
    expected = set(model.state_dict()) | {
        k for k in state_dict if k.rsplit(".", 1)[-1].startswith(MARKER)
    }
    tails = {k.rsplit(".", 1)[-1] for k in expected}
    depth = max((k.count(".") for k in expected), default=0) + 1  # most parts of a name
    matches: Counter[str] = Counter()
    for key in state_dict:
        pieces = key.rsplit(".", depth)
        if pieces[-1] not in tails:
            continue
        for start in range(len(pieces)):  # the key without 0, 1, ... leading parts
            rest = ".".join(pieces[start:])
            if rest in expected:
                matches[key[: len(key) - len(rest)]] += 1
    best = min(matches, key=lambda prefix: (-matches[prefix], len(prefix), prefix), default="")
    if not best:
        return dict(state_dict)
    return {k[len(best) :]: v for k, v in state_dict.items() if k.startswith(best)}


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``, adopting the ODE form its markers record.

    Stages whose marker is present are converted to ODE form with the stored horizon before
    loading; stages without one are returned to the plain form. A prefix such as ``model.``
    (Lightning) or ``module.`` (DDP) is stripped.

    Raises:
        CheckpointError: the keys do not match the model (the message lists missing and
            unexpected keys), or a marker is not a finite positive scalar horizon the stage
            can use (the message names the marker's key).
    """
    state_dict = strip_prefix(state_dict, model)
    try:
        stages = find_stages(model)
    except ValueError:
        stages = []
    prefix_of = _module_prefixes(model)
    keys = [prefix_of[id(stage.container)] + stage.marker for stage in stages]
    horizons = [
        _marker_horizon(key, state_dict[key], stage) if key in state_dict else None
        for stage, key in zip(stages, keys)
    ]
    for stage, horizon in zip(stages, horizons):
        if horizon is None:
            unconvert_stage(stage)
            continue
        if stage.is_ode_form and stage.horizon != horizon:
            unconvert_stage(stage)
        convert_stage(stage, horizon)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {type(model).__name__} (another architecture or number "
            f"of classes?): {len(missing)} missing key(s) {_head(missing)}, {len(unexpected)} "
            f"unexpected key(s) {_head(unexpected)}"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: {reason(error)}"
        ) from None
    return model


def _marker_horizon(key: str, value: object, stage: Stage) -> float:
    """The horizon a stage marker records, refused unless ``stage`` can run with it."""
    if (
        not isinstance(value, Tensor)
        or value.dim() != 0
        or value.is_complex()
        or value.dtype == torch.bool
    ):
        found = (
            f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise CheckpointError(
            f"marker {key!r} must be a scalar holding the stage's ODE horizon (a finite "
            f"positive number); found {found}"
        )
    horizon = float(value)
    if not (math.isfinite(horizon) and horizon > 0):
        raise CheckpointError(
            f"marker {key!r} holds {horizon!r}; an ODE horizon is a finite positive number"
        )
    try:
        check_step(horizon, stage)
    except ValueError as error:
        raise CheckpointError(f"marker {key!r}: {error}") from None
    return horizon


def _head(keys: list[str], count: int = 8) -> str:
    shown = ", ".join(keys[:count])
    return f"[{shown}{', ...' if len(keys) > count else ''}]"
