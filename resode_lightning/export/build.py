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
from resode_lightning.core.paths import INTERPOLATIONS, Interpolation, fit_knots, knot_times
from resode_lightning.core.stages import Stage, find_stages
from resode_lightning.export.field import VectorField, WeightPath
from resode_lightning.export.solve import ADAPTIVE_METHODS, FIXED_METHODS, GRADIENTS, NeuralODEStage
from resode_lightning.export.source import source_spec

Steps = int | float | Mapping[str, int] | None

CONFIG_ATTRIBUTE = "neural_ode_config"
"""Attribute of an exported model holding its export configuration (a JSON-able dict)."""


def export_neural_ode(
    model: nn.Module,
    *,
    method: str = "euler",
    steps: Steps = None,
    interpolation: Interpolation = "linear",
    gradient: str = "checkpoint",
    fold_bn: bool = True,
    knots: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    compile: bool = False,
) -> nn.Module:
    """A copy of ``model`` in which every residual stage is a neural ODE solved by torchdiffeq.

    Each stage of ``L`` blocks becomes ``dx/dt = F(t, x)`` on ``[0, horizon]`` (horizon 1 for a
    plain stage), ``F`` the residual branch with weights ``θ(t)``: a path through the blocks'
    weights in the ODE parametrisation, block ``k`` at ``t_k = k * horizon / L``. Post-activation
    blocks (torchvision's) use the projected field of THEORY.md. Euler on the original grid
    reproduces the model (eval mode, running BatchNorm statistics). Everything outside the
    stages is kept as it is. The copy is in eval mode.

    Args:
        model: a torchvision ResNet (plain or ODE form), an ``ode_resnet``, or any model whose
            blocks are registered.
        method: a torchdiffeq method: fixed-grid (``euler``, ``midpoint``, ``rk4``, ...) or
            adaptive (``dopri5``, ...).
        steps: fixed-grid steps per stage: ``None`` (each stage's depth), an int, a fraction of
            each stage's depth (a float, rounded, at least 1), or ``{stage name: int}``.
            Not allowed with adaptive methods.
        interpolation: weight path between knots, ``"linear"`` or ``"constant"`` (per step).
        gradient: ``"backprop"``, ``"checkpoint"`` (per-step ``torch.utils.checkpoint``: exact
            gradients, one stored state per step) or ``"adjoint"`` (``odeint_adjoint``: memory
            constant in steps; warns when the combination is known to give inexact gradients).
        fold_bn: fold each branch's BatchNorm into the preceding conv
            (``torch.nn.utils.fusion.fuse_conv_bn_eval``), so the field is convolutions only.
        knots: store each stage's path at this many knots (``2 <= knots <= L``), fitted by least
            squares (linear interpolation only). Compare ``sum(p.numel() for p in
            exported.parameters())`` with the source's for the saving.
        rtol: relative tolerance of adaptive methods.
        atol: absolute tolerance of adaptive methods.
        compile: run each field through ``torch.compile`` (the field, not the solver loop).

    Returns:
        The exported model, with its configuration in ``exported.neural_ode_config``.

    Raises:
        ValueError: no residual stage; an unknown method, gradient or interpolation; ``steps``
            with an adaptive method or of the wrong type; ``knots`` out of range or with
            constant interpolation.

    Example::

        >>> from torchvision.models import resnet18
        >>> ode = export_neural_ode(resnet18().eval(), method="rk4", gradient="adjoint")
        >>> ode(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    check_export_options(method, steps, interpolation, gradient, knots, rtol, atol)
    exported = copy.deepcopy(model).eval()
    stages = find_stages(exported)
    per_stage = _resolve_steps(stages, method, steps)
    if knots is not None:
        for stage in stages:
            if knots > stage.depth:
                raise ValueError(
                    f"knots={knots} exceeds the depth {stage.depth} of stage {stage.name!r}; "
                    f"choose 2 <= knots <= {min(s.depth for s in stages)} or knots=None"
                )
    if gradient == "adjoint":
        _warn_inexact_adjoint(stages, method, interpolation)
    for stage in reversed(stages):
        if not stage.is_ode_form:
            convert_stage(stage, 1.0)
        field = _field(stage, interpolation, fold_bn, knots)
        module = NeuralODEStage(
            field,
            stage.horizon,
            method=method,
            steps=per_stage[stage.name],
            gradient=gradient,
            rtol=rtol,
            atol=atol,
            compile=compile,
        )
        _replace(stage, module)
    config = {
        "source": source_spec(model),
        "export": {
            "method": method,
            "steps": dict(steps) if isinstance(steps, Mapping) else steps,
            "interpolation": interpolation,
            "gradient": gradient,
            "fold_bn": fold_bn,
            "knots": knots,
            "rtol": rtol,
            "atol": atol,
            "compile": compile,
        },
    }
    setattr(exported, CONFIG_ATTRIBUTE, config)
    return exported


def check_export_options(
    method: str,
    steps: Steps,
    interpolation: str,
    gradient: str,
    knots: int | None,
    rtol: float,
    atol: float,
) -> None:
    """Raise ``ValueError`` for export options that are invalid whatever the model."""
    if method not in FIXED_METHODS + ADAPTIVE_METHODS:
        raise ValueError(
            f"method must be a fixed-grid method {FIXED_METHODS} or an adaptive one "
            f"{ADAPTIVE_METHODS}, got {method!r}"
        )
    if method in ADAPTIVE_METHODS and steps is not None:
        raise ValueError(
            f"steps={steps!r} is for fixed-grid methods: {method} chooses its own steps from "
            f"rtol and "
            f"atol; pass steps=None, or a fixed-grid method such as 'rk4'"
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if knots is not None:
        if isinstance(knots, bool) or not isinstance(knots, int) or knots < 2:
            raise ValueError(
                f"knots must be an int >= 2 (or None for one knot per block), got {knots!r}"
            )
        if interpolation != "linear":
            raise ValueError("knots=... fits a linear path: use interpolation='linear'")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


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
        for name, count in steps.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"steps[{name!r}] must be a positive int, got {count!r}")
        return {stage.name: steps.get(stage.name, stage.depth) for stage in stages}
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, float))
        or not 0 < steps < float("inf")
    ):
        raise ValueError(
            f"steps must be a positive int, a positive fraction of each stage's depth, or a dict "
            f"by "
            f"stage name, got {steps!r}"
        )
    if isinstance(steps, int):
        return {stage.name: steps for stage in stages}
    return {stage.name: max(1, round(steps * stage.depth)) for stage in stages}


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
            "Use gradient='checkpoint' for exact gradients with one stored state per step.",
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
