"""Export a ResNet as a neural ODE: each residual stage becomes a field solved by torchdiffeq."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from resode_lightning.core.blocks import fold_batchnorm, set_block_step
from resode_lightning.core.odeform import convert_stage
from resode_lightning.core.paths import Interpolation, fit_knots, knot_times
from resode_lightning.core.stages import Stage, find_stages
from resode_lightning.export.field import VectorField, WeightPath
from resode_lightning.export.options import MAX_STEPS, ExportOptions, Steps
from resode_lightning.export.solve import ADAPTIVE_METHODS, NeuralODEStage
from resode_lightning.export.source import source_spec

CONFIG_ATTRIBUTE = "neural_ode_config"
"""Attribute of an exported model holding its export configuration (a JSON-able dict)."""


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
        overrides: option names and values replacing those of ``options``
            (``export_neural_ode(model, method="rk4", steps=0.5)``).

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
    method, knots = options.method, options.knots
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
    if options.gradient == "adjoint":
        _warn_inexact_adjoint(stages, method, options.interpolation)
    for stage in reversed(stages):
        if not stage.is_ode_form:
            convert_stage(stage, 1.0)
        field = _field(stage, options.interpolation, options.fold_bn, knots)
        module = NeuralODEStage(
            field,
            stage.horizon,
            method=method,
            steps=per_stage[stage.name],
            gradient=options.gradient,
            rtol=options.rtol,
            atol=options.atol,
            checkpoints=options.checkpoints,
            compile=options.compile,
            source_depth=stage.depth,
            stage_name=stage.name,
        )
        _replace(stage, module)
    config = {"source": source_spec(model), "export": options.to_config()}
    setattr(exported, CONFIG_ATTRIBUTE, config)
    return exported


def _resolve_steps(stages: list[Stage], method: str, steps: Steps) -> dict[str, int | None]:
    if method in ADAPTIVE_METHODS:
        return {stage.name: None for stage in stages}
    if steps is None:
        return {stage.name: stage.depth for stage in stages}
    if isinstance(steps, Mapping):
        names = {stage.name for stage in stages}
        unknown = sorted(set(steps) - names)
        if unknown:
            raise ValueError(f"steps names unknown stage(s) {unknown}; stages are {sorted(names)}")
        return {stage.name: steps.get(stage.name, stage.depth) for stage in stages}
    if isinstance(steps, int):
        return {stage.name: steps for stage in stages}
    counts = {stage.name: max(1, round(steps * stage.depth)) for stage in stages}
    if max(counts.values()) > MAX_STEPS:
        raise ValueError(f"steps={steps!r} of each stage's depth gives more than {MAX_STEPS:,}")
    return counts


def _warn_inexact_adjoint(stages: list[Stage], method: str, interpolation: str) -> None:
    reasons = []
    post = sorted({stage.name for stage in stages if stage.post is not None})
    if post:
        reasons.append(
            f"stages {post} have post-activation blocks (relu after the sum): the projected field "
            f"forgets, so the backward reconstruction of the state is inexact"
        )
    if interpolation == "constant":
        reasons.append("the weights are piecewise constant in t (use interpolation='linear')")
    if method not in ("rk4",) + ADAPTIVE_METHODS:
        reasons.append(f"{method} is a low-order method (use 'rk4' or 'dopri5')")
    if reasons:
        warnings.warn(
            "gradient='adjoint' gives inexact gradients here: " + "; ".join(reasons) + ". "
            "For exact gradients use gradient='recursive' (memory bounded by `checkpoints` "
            "states whatever the steps) or gradient='checkpoint' (one state per step).",
            UserWarning,
            stacklevel=3,
        )


def _field(
    stage: Stage, interpolation: Interpolation, fold_bn: bool, knots: int | None
) -> VectorField:
    adapter = stage.adapter
    blocks = stage.blocks
    scale = 1.0
    if adapter.last_layer(blocks[0]) is None and adapter.step_attribute is None:
        scale = 1.0 / stage.step
    for block in blocks:
        set_block_step(block, adapter, None)
        if fold_bn:
            fold_batchnorm(block, adapter.conv_bn_pairs(block))
    trainable = {name for name, _ in blocks[0].named_parameters()}
    states = [block.state_dict() for block in blocks]
    values = {
        name: torch.stack([state[name] for state in states]).detach()
        for name, tensor in states[0].items()
        if tensor.is_floating_point()
    }
    times = knot_times(stage.depth, stage.horizon)
    if knots is not None:
        fitted = {
            name: fit_knots(value, times.to(value.device), knots) for name, value in values.items()
        }
        values = {name: value for name, (value, _) in fitted.items()}
        times = next(iter(fitted.values()))[1].cpu()
    path = WeightPath(values, times, trainable, interpolation)
    return VectorField(copy.deepcopy(blocks[0]), adapter.branch, stage.post, path, scale)


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
    """The export configuration recorded on a model returned by :func:`export_neural_ode`.

    Raises:
        ValueError: ``model`` was not made by :func:`export_neural_ode`.
    """
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} was not made by export_neural_ode (no {CONFIG_ATTRIBUTE})"
        )
    return config
