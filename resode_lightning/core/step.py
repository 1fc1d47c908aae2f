"""The step of an ODE-form branch, as a module in the graph.

In ODE form the layer ending a residual branch (torchvision's ``bn2`` or ``bn3``) holds its
weight and bias times ``L / horizon`` and its output is multiplied by the step
``h = horizon / L``. :class:`ODEStep` takes that layer's place and computes
``layer(x) * step``, an ordinary module call followed by a multiplication, so that graph
capture (``torch.fx``, ``torch.jit.script``, ``torch.export``) and the transforms built on it
(conv/BatchNorm fusion, FX quantization) see the step. The wrapper is invisible in state
dicts: its layer's tensors are saved and loaded under the wrapper's own name
(``layer1.0.bn2.weight``, not ``layer1.0.bn2.layer.weight``).

Eager-mode quantization (``fuse_modules``, ``prepare``, ``convert``) finds fuser methods and
quantized modules by exact module type; importing this module registers the wrapper in
torch's default tables: a ``(conv, ODEStep)`` pair fuses into an ``ODEStep`` around the fused
conv, and ``convert`` turns an ``ODEStep`` into a :class:`QuantizedODEStep`, which multiplies
a quantized output by the step with ``torch.ops.quantized.mul_scalar``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import fuser_method_mappings, quantization_mappings

_INNER = "layer"


class ODEStep(nn.Module):
    """``layer(x) * step``: the last layer of an ODE-form branch and the step ``h``.

    State-dict keys are ``layer``'s own, under the wrapper's name.

    Args:
        layer: the affine layer ending the branch, its weight and bias in the ODE
            parametrisation (``L / horizon`` times the plain ones).
        step: the step ``h = horizon / L``.
    """

    def __init__(self, layer: nn.Module, step: float) -> None:
        super().__init__()
        self.layer = layer
        self.step = float(step)
        # the public names (register_state_dict_post_hook, ...) need torch >= 2.5
        self._register_state_dict_hook(_flatten_keys)
        self._register_load_state_dict_pre_hook(_nest_keys, with_module=True)
        self.register_load_state_dict_post_hook(_flatten_reported_keys)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x) * self.step

    def extra_repr(self) -> str:
        return f"step={self.step:g}"


class QuantizedODEStep(ODEStep):
    """An :class:`ODEStep` whose layer returns quantized tensors (eager-mode ``convert``).

    For ``step > 0``, ``mul_scalar`` only multiplies the output's scale: no rounding.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.mul_scalar(self.layer(x), self.step)

    @classmethod
    def from_float(cls, module: ODEStep) -> QuantizedODEStep:
        """The quantized counterpart of ``module`` (its layer already converted)."""
        return cls(module.layer, module.step)


def _flatten_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """Save the wrapped layer's entries under the wrapper's name (``bn2.layer.w`` -> ``bn2.w``)."""
    inner = f"{prefix}{_INNER}."
    for key in [key for key in state_dict if key.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None and inner[:-1] in metadata:
        metadata[prefix[:-1]] = metadata.pop(inner[:-1])


def _nest_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load the wrapper's entries into the wrapped layer (``bn2.w`` -> ``bn2.layer.w``)."""
    inner = f"{prefix}{_INNER}."
    keys = [key for key in state_dict if key.startswith(prefix)]
    state_dict.update({inner + key[len(prefix) :]: state_dict.pop(key) for key in keys})
    module.__dict__["_loading_prefix"] = prefix


def _flatten_reported_keys(module: nn.Module, incompatible: Any) -> None:
    """Report the wrapped layer's missing and unexpected keys under the names they are saved
    with (once the layer is loaded, with the prefix :func:`_nest_keys` kept)."""
    prefix = module.__dict__.pop("_loading_prefix")
    inner = f"{prefix}{_INNER}."
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [prefix + key[len(inner) :] if key.startswith(inner) else key for key in keys]


def step_wrappers(module: nn.Module) -> Iterator[tuple[str, ODEStep]]:
    """The :class:`ODEStep` modules inside ``module``, with their paths."""
    for name, child in module.named_modules():
        if isinstance(child, ODEStep):
            yield name, child


def state_dict_name(module: nn.Module, name: str) -> str:
    """The state-dict key of ``module``'s parameter, buffer or submodule path ``name``: the
    path without the ``layer`` step of any :class:`ODEStep` in it (``bn2.layer.weight`` ->
    ``bn2.weight``)."""
    return _key(name, [path for path, _ in step_wrappers(module)])


def named_parameters_by_key(module: nn.Module) -> OrderedDict[str, nn.Parameter]:
    """``module.named_parameters()`` under their state-dict keys (see :func:`state_dict_name`)."""
    paths = [path for path, _ in step_wrappers(module)]
    return OrderedDict((_key(name, paths), tensor) for name, tensor in module.named_parameters())


def named_modules_by_key(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``module.named_modules()`` as in the plain form: each :class:`ODEStep` left out, the
    layer it holds under the ODEStep's name (see :func:`state_dict_name`)."""
    paths = [path for path, _ in step_wrappers(module)]
    for name, child in module.named_modules():
        if not isinstance(child, ODEStep):
            yield _key(name, paths), child


def _key(name: str, wrapper_paths: list[str]) -> str:
    for path in wrapper_paths:
        inner = f"{path}.{_INNER}" if path else _INNER
        if name == inner or name.startswith(f"{inner}."):
            rest = name[len(inner) + 1 :]
            return f"{path}.{rest}" if path and rest else path or rest
    return name


def _fuse_into_step(is_qat: bool, first: nn.Module, step: ODEStep) -> ODEStep:
    """Eager fuser method for ``(conv or linear, ODEStep)``: the pair fused, in the ODEStep."""
    fuser = fuser_method_mappings.get_fuser_method((type(first), type(step.layer)))
    return ODEStep(fuser(is_qat, first, step.layer), step.step)


def _register_eager_quantization() -> None:
    """Teach eager-mode ``fuse_modules`` and ``convert`` the wrapper, in torch's default tables
    (``fuse_model`` of torchvision's quantizable ResNets passes no table of its own)."""
    fusers = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for first in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
        fusers[(first, ODEStep)] = _fuse_into_step
    quantization_mappings.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS[ODEStep] = QuantizedODEStep


_register_eager_quantization()
