"""Export a ResNet as a neural ODE: each residual stage becomes a field solved by torchdiffeq."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from resode_lightning.core.adapters.inferred import forget_graph
from resode_lightning.core.blocks import fold_batchnorm, foldable_pairs, set_block_step
from resode_lightning.core.budget import Steps, steps_per_stage
from resode_lightning.core.odeform import convert_stage
from resode_lightning.core.paths import Interpolation, fit_knots, knot_times
from resode_lightning.core.stages import Stage, find_stages
from resode_lightning.export.field import VectorField, WeightPath
from resode_lightning.export.options import (
    Adjoint,
    ExportOptions,
    PiecewiseConstant,
    PiecewiseLinear,
    RecursiveCheckpointed,
)
from resode_lightning.export.solve import NeuralODEStage
from resode_lightning.export.solvers import METHODS
from resode_lightning.export.source import source_spec

CONFIG_ATTRIBUTE = "neural_ode_config"
"""Attribute of an exported model holding its export configuration (a JSON-able dict)."""
ADJOINT_ORDER = 4
"""The lowest order of a fixed-grid method whose continuous adjoint the export does not warn
about: below it the discrete solve is too far from the ODE that the adjoint differentiates."""


def export_neural_ode(
    model: nn.Module, options: ExportOptions | None = None, **overrides: Any
) -> nn.Module:
    """A copy of ``model`` in which every residual stage is a neural ODE.

    Each stage of ``L`` blocks becomes ``dx/dt = F(t, x)`` on ``[0, horizon]`` (horizon 1 for a
    plain stage), ``F`` the residual branch with weights ``θ(t)``: a path through the blocks'
    weights in the ODE parametrisation, block ``k`` at ``t_k = k * horizon / L``. Post-activation
    blocks (torchvision's) use the projected field of ``docs/theory.md``. Euler on the original
    grid reproduces the model (eval mode, running BatchNorm statistics). Everything outside the
    stages is kept as it is. The copy is in eval mode.

    Args:
        model: a torchvision ResNet (plain or ODE form), a timm ResNet, an ``ode_resnet``, or
            any model whose blocks are registered.
        options: the :class:`~resode_lightning.export.options.ExportOptions` (defaults: Euler
            at each stage's depth, linear weight path, checkpointed gradients, BN folded).
        overrides: options replacing those of ``options``, by field or flat name (see
            :meth:`~resode_lightning.export.options.ExportOptions.replace`):
            ``method="rk4", steps=0.5``, ``gradient=RecursiveCheckpointed(checkpoints=4)``, or
            ``gradient="recursive", checkpoints=4``.

    Returns:
        The exported model, with its configuration in ``exported.neural_ode_config``.

    Raises:
        ValueError: no residual stage; an invalid option (see ``ExportOptions``); ``steps``
            naming an unknown stage; ``knots`` above a stage's depth.

    Example::

        >>> from torchvision.models import resnet18
        >>> ode = export_neural_ode(resnet18().eval(), method="rk4", gradient="recursive")
        >>> ode(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    options = (options or ExportOptions()).replace(**overrides)
    return build_export(model, options)


def build_export(
    model: nn.Module, options: ExportOptions, *, fold_at_knots: bool = False
) -> nn.Module:
    """:func:`export_neural_ode` with its options resolved (``fold_at_knots``: see ``_field``)."""
    method, interpolation = options.method, options.interpolation
    knots = interpolation.knots if isinstance(interpolation, PiecewiseLinear) else None
    exported = copy.deepcopy(model).eval()
    stages = find_stages(exported)
    per_stage = _resolve_steps(stages, method, options.steps)
    if knots is not None:
        for stage in stages:
            if knots > stage.depth:
                raise ValueError(
                    f"knots={knots} exceeds the depth {stage.depth} of stage {stage.name!r}; "
                    f"choose 2 <= knots <= {min(s.depth for s in stages)} or knots=None"
                )
    if isinstance(options.gradient, Adjoint):
        _warn_inexact_adjoint(stages, method, interpolation)
    for stage in reversed(stages):
        promote_block_scalars(stage)
        if not stage.is_ode_form:
            convert_stage(stage, 1.0)
        stochastic = [
            f"block {k}: {layer}"
            for k, block in enumerate(stage.blocks)
            for layer in stochastic_layers(block)
        ]
        field = _field(
            stage, interpolation.name, options.fold_bn, knots, fold_at_knots=fold_at_knots
        )
        module = NeuralODEStage(
            field,
            stage.horizon,
            method=method,
            steps=per_stage[stage.name],
            gradient=options.gradient.name,
            rtol=options.rtol,
            atol=options.atol,
            checkpoints=(
                options.gradient.checkpoints
                if isinstance(options.gradient, RecursiveCheckpointed)
                else None
            ),
            compile=options.compile,
            source_depth=stage.depth,
            stage_name=stage.name,
            stochastic=tuple(stochastic),
        )
        _replace(stage, module)
    config = {"source": source_spec(model), "export": options.to_config()}
    setattr(exported, CONFIG_ATTRIBUTE, config)
    return exported.eval()


def _resolve_steps(stages: list[Stage], method: str, steps: Steps) -> dict[str, int | None]:
    if METHODS[method].adaptive:
        return {stage.name: None for stage in stages}
    depths = {stage.name: stage.depth for stage in stages}
    return steps_per_stage(steps, depths, depths)


def _warn_inexact_adjoint(stages: list[Stage], method: str, interpolation: object) -> None:
    reasons = []
    post = sorted({stage.name for stage in stages if stage.post is not None})
    if post:
        reasons.append(
            f"stages {post} have post-activation blocks (relu after the sum): the projected field "
            f"forgets, so the backward reconstruction of the state is inexact"
        )
    if isinstance(interpolation, PiecewiseConstant):
        reasons.append("the weights are piecewise constant in t (use interpolation='linear')")
    solver = METHODS[method]
    if not solver.adaptive and solver.order < ADJOINT_ORDER:
        reasons.append(
            f"{method} is a low-order method (order {solver.order}; use a fixed-grid method of "
            f"order {ADJOINT_ORDER} or more such as 'rk4', or an adaptive one such as 'dopri5')"
        )
    if reasons:
        warnings.warn(
            "gradient='adjoint' gives inexact gradients here: " + "; ".join(reasons) + ". "
            "For exact gradients use gradient='recursive' (memory bounded by `checkpoints` "
            "states whatever the steps) or gradient='checkpoint' (one state per step).",
            UserWarning,
            stacklevel=3,
        )


def _field(
    stage: Stage,
    interpolation: Interpolation,
    fold_bn: bool,
    knots: int | None,
    *,
    fold_at_knots: bool = False,
) -> VectorField:
    """The stage's field: a path through the blocks' unfolded tensors (ODE parametrisation).

    BatchNorm is folded where a grid's weights are bound (``fold_bn``), after interpolation,
    so that every step count computes the interpolated blocks. ``fold_at_knots`` folds the
    knots themselves instead, as files of format 2 were written.
    """
    adapter = stage.adapter
    blocks = stage.blocks
    scale = 1.0
    if adapter.last_layer(blocks[0]) is None and adapter.step_attribute is None:
        scale = 1.0 / stage.step
    for block in blocks:
        set_block_step(block, adapter, None)
    pairs = foldable_pairs(blocks[0], adapter.conv_bn_pairs(blocks[0])) if fold_bn else ()
    if fold_at_knots:
        for block in blocks:
            fold_batchnorm(block, adapter.conv_bn_pairs(block))
    trainable, frozen = _trainable(stage)
    states = [block.state_dict() for block in blocks]
    values = {
        name: torch.stack([state[name] for state in states]).detach()
        for name, tensor in states[0].items()
        if tensor.is_floating_point()
    }
    times = knot_times(stage.depth, stage.horizon)
    if knots is not None:
        fitted = {name: fit_knots(value, times, knots) for name, value in values.items()}
        values = {name: value for name, (value, _) in fitted.items()}
        times = next(iter(fitted.values()))[1].cpu()
    path = WeightPath(values, times, trainable, interpolation, frozen)
    template = copy.deepcopy(blocks[0])
    field = VectorField(
        template, adapter.branch, stage.post, path, scale, () if fold_at_knots else pairs
    )
    field.folds_batchnorm = bool(pairs)
    return field


def _trainable(stage: Stage) -> tuple[set[str], set[str]]:
    """The block parameters' names, and those frozen (``requires_grad=False``) in every block.

    Raises:
        ValueError: a parameter is frozen in some blocks of the stage and not in others (one
            path cannot be both).
    """
    flags: dict[str, set[bool]] = {}
    for block in stage.blocks:
        for name, parameter in block.named_parameters():
            flags.setdefault(name, set()).add(parameter.requires_grad)
    mixed = sorted(name for name, seen in flags.items() if len(seen) > 1)
    if mixed:
        raise ValueError(
            f"stage {stage.name!r}: {mixed[0]} requires gradients in some blocks and not in "
            f"others; one weight path cannot be both: freeze or unfreeze it in every block of "
            f"the stage before exporting"
        )
    return set(flags), {name for name, seen in flags.items() if seen == {False}}


def stochastic_layers(block: nn.Module) -> list[str]:
    """The layers of ``block`` that are random in training (dropout, drop-path), described.

    The field runs its template in eval mode, so a training-mode export cannot apply them.
    """
    found = []
    for name, module in block.named_modules():
        rate = _random_rate(module)
        if rate:
            found.append(f"{name} ({type(module).__name__}, rate {rate:g})")
    return found


def _random_rate(module: nn.Module) -> float:
    """The rate of a dropout or drop-path layer (timm's ``DropPath``, torchvision's
    ``StochasticDepth``), 0 for any other module."""
    kind = type(module).__name__
    if not (isinstance(module, nn.modules.dropout._DropoutNd) or kind in _RANDOM_RATES):
        return 0.0
    rate = getattr(module, _RANDOM_RATES.get(kind, "p"), 0.0)
    return float(rate) if isinstance(rate, (int, float)) else 0.0


_RANDOM_RATES = {"DropPath": "drop_prob", "StochasticDepth": "p"}


def _plain(value: object) -> bool:
    """Plain data a block's code may branch on: numbers, flags, strings, tuples of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(item) for item in value)


def promote_block_scalars(stage: Stage) -> list[str]:
    """Make the number attributes that differ between a stage's blocks buffers, in place.

    A block's code may read Python numbers of its own (NF-ResNet's ``beta``); the field runs
    one template block's code, so numbers that vary along the stage must be tensors for them
    to follow the weight path (interpolated like the weights). Returns their names.

    Raises:
        ValueError: any other plain attribute differs between blocks (an int, a flag, a
            string, a torch layer's setting such as a conv's dilation): one code cannot run
            them all; the message names them.
    """
    values: dict[tuple[str, str], list[object]] = {}
    own: set[tuple[str, str]] = set()  # attributes of the blocks' own code, not torch's layers
    for block in stage.blocks:
        for path, module in block.named_modules():
            if _random_rate(module):
                continue  # random layers are refused apart
            for attribute, value in vars(module).items():
                if not attribute.startswith("_") and attribute != "training" and _plain(value):
                    values.setdefault((path, attribute), []).append(value)
                    if not type(module).__module__.startswith("torch."):
                        own.add((path, attribute))
    varying = {key: found for key, found in values.items() if any(v != found[0] for v in found)}
    names = {key: f"{key[0]}.{key[1]}".lstrip(".") for key in varying}
    fixed = [
        f"{names[key]} ({', '.join(map(repr, dict.fromkeys(found)))})"
        for key, found in varying.items()
        if key not in own or not all(type(value) is float for value in found)
    ]
    if fixed:
        raise ValueError(
            f"stage {stage.name!r}: the blocks differ in {'; '.join(fixed[:3])}, which a weight "
            f"path cannot interpolate (only float attributes of the blocks' own code can follow "
            f"it); export a model whose stage blocks differ only in tensors and floats"
        )
    reference = next(stage.blocks[0].parameters(), None)
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    for (path, attribute), found in varying.items():
        for block, value in zip(stage.blocks, found):
            module = block.get_submodule(path)
            del module.__dict__[attribute]
            module.register_buffer(attribute, torch.tensor(float(value), dtype=dtype))
            forget_graph(block)
    return list(names.values())


def _replace(stage: Stage, module: nn.Module) -> None:
    """Put ``module`` in place of the stage's blocks in their container; drop the stage's marker."""
    container = stage.container
    names = list(container._modules)
    children = list(container._modules.values())
    start, stop = stage.indices[0], stage.indices[-1] + 1
    if all(name.isdigit() for name in names):
        kept = children[:start] + [module] + children[stop:]
        container._modules.clear()
        for i, child in enumerate(kept):
            container._modules[str(i)] = child
    else:
        container._modules[names[start]] = module
        for name in names[start + 1 : stop]:
            del container._modules[name]
    container._buffers.pop(stage.marker, None)


def exported_config(model: nn.Module) -> dict[str, Any]:
    """The export configuration of a model returned by :func:`export_neural_ode`.

    The method and steps are read from the stages as they run now (after
    :func:`~resode_lightning.set_steps`), and ``fold_bn`` is true only where some stage has
    conv/BatchNorm pairs to fold, so the configuration states what the model does.

    Raises:
        ValueError: ``model`` was not made by :func:`export_neural_ode`.
    """
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} was not made by export_neural_ode (no {CONFIG_ATTRIBUTE})"
        )
    stages = [module for module in model.modules() if isinstance(module, NeuralODEStage)]
    methods = {stage.method for stage in stages}
    if len(methods) != 1:
        raise ValueError(
            f"the stages run different methods {sorted(methods)}; give them one method "
            f"(set_steps(model, steps, method=...)) before saving"
        )
    options = ExportOptions.from_config(config["export"])
    method = methods.pop()
    steps = None if METHODS[method].adaptive else {s.stage_name: s.steps for s in stages}
    folds = options.fold_bn and any(stage.field.folds_batchnorm for stage in stages)
    options = options.replace(method=method, steps=steps, fold_bn=folds)
    return {**config, "export": options.to_config()}
