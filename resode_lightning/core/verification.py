"""Verification of a block adapter on a float64 probe: the adapter computes the block.

:func:`verify_block` checks, once per block layout, that ``block(x) == post(x + branch(x))``,
that the branch scales with its last layer (so the ODE-form rescale and the exported field
compute the block) and that folding the adapter's conv/norm pairs keeps the branch.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resode_lightning.core.blocks import (
    BlockAdapter,
    BlockAdapterError,
    fold_batchnorm,
    is_plain_conv,
    qualified_name,
    set_block_step,
)
from resode_lightning.core.step import named_modules_by_key

_VERIFIED: set[tuple[BlockAdapter, tuple]] = set()
_TOLERANCE = 1e-6
_FACTOR = 3.0


def verify_block(block: nn.Module, adapter: BlockAdapter) -> None:
    """Check ``adapter`` on a float64 copy of ``block`` with random weights, once per layout.

    Checks that ``block(x) == post(x + branch(block, x))``; that the branch scales with the
    last layer's weight and bias (or with the step attribute), so that the ODE-form rescale and
    the exported field compute the block; and that folding ``conv_bn_pairs`` keeps the branch.
    Together these make one Euler step of the exported field equal to the block.

    Raises:
        BlockAdapterError: a check fails; the message names the block type, the check, the
            relative error and the likely cause.
    """
    key = (adapter, _layout(block))
    if key in _VERIFIED:
        return
    if any(t.is_meta for t in block.parameters()):
        return  # nothing to compute on; checked when the block holds real weights
    probe = probe_copy(block)
    x = runnable_input(probe)
    if x is None:
        warnings.warn(
            f"{qualified_name(type(block))}: its adapter is not verified, because the block "
            f"could not run on an input of the width of any of its conv, norm or linear layers",
            UserWarning,
            stacklevel=3,
        )
        return
    try:
        with torch.no_grad():
            set_block_step(probe, adapter, None)
            _check_sum(probe, adapter, x)
            _check_scaling(probe, adapter, x)
            _check_folding(probe, adapter, x)
    except BlockAdapterError:
        raise
    except Exception as error:  # user code in the adapter: report it with the block type
        raise _fail(
            block, "the adapter raised on the block", math.inf, f"{type(error).__name__}: {error}"
        ) from error
    _VERIFIED.add(key)


def runnable_input(block: nn.Module) -> Tensor | None:
    """The first input of the width of one of its layers that ``block`` runs on, else ``None``."""
    for x in _probe_inputs(block):
        try:
            with torch.no_grad():
                block(x.clone())
        except Exception:  # the block's own code rejects this width: try the next one
            continue
        return x
    return None


def _layout(block: nn.Module) -> tuple:
    """The block's submodule types by name, the same in plain and ODE form."""
    return tuple((name, type(module)) for name, module in named_modules_by_key(block))


def probe_copy(block: nn.Module) -> nn.Module:
    """A float64 copy of ``block`` on the CPU with random weights (a meta-device block too)."""
    probe = copy.deepcopy(block)
    if any(t.is_meta for t in [*probe.parameters(), *probe.buffers()]):
        probe = probe.to_empty(device="cpu")
    probe = probe.to("cpu", torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*probe.named_parameters(), *probe.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif leaf == "running_mean" or (isinstance(tensor, nn.Parameter) and leaf == "bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif isinstance(tensor, nn.Parameter) and tensor.dim() <= 1:  # gains, scalars too
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif isinstance(tensor, nn.Parameter):
                fan_in = max(1, tensor[0].numel())
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))
    return probe


def _probe_inputs(block: nn.Module) -> list[Tensor]:
    """Candidate inputs of the block's width, from its conv, norm and linear layers in order."""
    generator = torch.Generator().manual_seed(1)
    sizes: list[tuple[int, ...]] = []
    for module in block.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            size = (2, module.in_channels, *[8] * len(module.kernel_size))
        elif isinstance(module, _BatchNorm):
            dims = {nn.BatchNorm1d: 1, nn.BatchNorm3d: 3}
            extra = next((d for cls, d in dims.items() if isinstance(module, cls)), 2)
            size = (2, module.num_features, *[8] * extra)
        elif isinstance(module, nn.Linear):
            size = (2, module.in_features)
        else:
            continue
        if size not in sizes:
            sizes.append(size)
    return [torch.randn(size, generator=generator, dtype=torch.float64) for size in sizes]


def _relative(actual: Tensor, expected: Tensor) -> float:
    scale = expected.norm().item() or 1.0
    return (actual - expected).norm().item() / scale


def _fail(block: nn.Module, check: str, error: float, cause: str) -> BlockAdapterError:
    return BlockAdapterError(
        f"the adapter of {qualified_name(type(block))} does not describe the block: {check} "
        f"(relative error {error:.2g} on a float64 probe). Likely cause: {cause}"
    )


def _check_sum(block: nn.Module, adapter: BlockAdapter, x: Tensor) -> None:
    out = block(x.clone())
    increment = adapter.branch(block, x.clone())
    post = adapter.post(block)
    summed = x + increment
    error = _relative(post(summed.clone()) if post is not None else summed, out)
    if error <= _TOLERANCE:
        return
    if post is None and _relative(torch.relu(summed), out) <= _TOLERANCE:
        cause = (
            "the block applies an activation after the sum: pass post='<its activation "
            "attribute>' (or post=torch.relu) to register_block"
        )
    elif post is not None and _relative(summed, out) <= _TOLERANCE:
        cause = "the block returns x + branch with no activation after the sum: pass post=None"
    else:
        cause = "branch(block, x) is not what the block adds to x; compare it with forward()"
    raise _fail(block, "block(x) != post(x + branch(block, x))", error, cause)


def _check_scaling(block: nn.Module, adapter: BlockAdapter, x: Tensor) -> None:
    if adapter.step_attribute is not None:
        scaled = copy.deepcopy(block)
        setattr(scaled, adapter.step_attribute, 1.0)
        unit = adapter.branch(scaled, x.clone())
        setattr(scaled, adapter.step_attribute, _FACTOR)
        error = _relative(adapter.branch(scaled, x.clone()), _FACTOR * unit)
        if error > _TOLERANCE:
            raise _fail(
                block,
                f"setting {adapter.step_attribute!r} to c does not multiply the branch by c",
                error,
                f"the block does not compute x + {adapter.step_attribute} * F(x); pass "
                f"step_attribute=None",
            )
    last = adapter.last_layer(block)
    if last is None:
        return
    if not any(module is last for module in block.modules()):
        raise _fail(block, "last_layer(block) is not a submodule of the block", math.inf, "")
    scaled = copy.deepcopy(block)
    layer = adapter.last_layer(scaled)
    for name in ("weight", "bias"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, Tensor):
            tensor.mul_(_FACTOR)
    expected = _FACTOR * adapter.branch(block, x.clone())
    error = _relative(adapter.branch(scaled, x.clone()), expected)
    if error <= _TOLERANCE:
        return
    if isinstance(last, nn.modules.conv._ConvNd) and not is_plain_conv(last):
        cause = (
            f"last_layer is a {type(last).__name__}, whose output does not scale with its weight "
            f"(weight standardisation?): use last_layer=None"
        )
    else:
        cause = (
            "a non-linear map follows last_layer (an attention gate?): use last_layer=None, "
            "or the last layer after the gate"
        )
    raise _fail(
        block, "scaling last_layer's weight and bias by c does not scale the branch", error, cause
    )


def _check_folding(block: nn.Module, adapter: BlockAdapter, x: Tensor) -> None:
    pairs = adapter.conv_bn_pairs(block)
    if not pairs:
        return
    folded = copy.deepcopy(block)
    try:
        fold_batchnorm(folded, pairs)
    except AttributeError as error:
        raise _fail(
            block, f"conv_bn_pairs {pairs} name no submodules", math.inf, str(error)
        ) from None
    error = _relative(adapter.branch(folded, x.clone()), adapter.branch(block, x.clone()))
    if error > _TOLERANCE:
        raise _fail(
            block,
            f"folding conv_bn_pairs {pairs} changes the branch",
            error,
            "a pair's norm does not directly follow its conv",
        )
