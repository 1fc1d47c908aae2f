"""The vector field of one stage: its residual branch with weights that are a path in time.

Block ``k`` of a stage in ODE form computes ``P(x + h F_k(x))``. The field evaluates the
branch of a template block with the weights ``θ(t)`` of a :class:`WeightPath` through the
per-block weights (knot ``k`` at ``t_k = k h``), so that an Euler step on the original grid is
block ``k`` itself. For post-activation blocks (``P`` not the identity) the field is the
projected field (``docs/theory.md``, "Post-activation blocks and the projected field"):
at resolution ``s`` (the solver's step)

    F̃_s(t, x) = (P(x + s F(t, x)) - x) / s,

whose Euler step of size ``s`` is ``P(x + s F)``; for ``P = relu`` it is ``max(F, -x / s)`` on
the non-negative orthant, and its limit ``s → 0`` (used by adaptive solvers) is
``F̃ = F where x > 0, relu(F) where x <= 0``.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from resode_lightning.core.blocks import Pairs, fold_batchnorm
from resode_lightning.core.paths import INTERPOLATIONS, Interpolation, interpolate


def _key(name: str) -> str:
    """A state-dict-safe key for a dotted tensor name (``conv1.weight`` -> ``conv1-weight``)."""
    return name.replace(".", "-")


class WeightPath(nn.Module):
    """Tensors of one block type given at knot times, evaluated at any ``t`` by interpolation.

    Args:
        knots: ``{name: tensor of shape (m, *shape)}``: the value of every block tensor at the
            ``m`` knots. Tensors in ``trainable`` become parameters, the others buffers.
        times: increasing knot times, shape ``(m,)`` (kept in float64).
        trainable: names whose path is an ``nn.Parameter``.
        interpolation: ``"constant"`` or ``"linear"`` in ``t`` between knots.
        frozen: names of ``trainable`` whose parameter does not require gradients.
    """

    def __init__(
        self,
        knots: Mapping[str, Tensor],
        times: Tensor,
        trainable: set[str],
        interpolation: Interpolation,
        frozen: set[str] = frozenset(),
    ) -> None:
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        self.interpolation = interpolation
        self.names = list(knots)
        self.register_buffer("times", times.detach().to(torch.float64).clone())
        self.values = nn.ParameterDict()
        for name, value in knots.items():
            value = value.detach().clone()
            if name in trainable:
                self.values[_key(name)] = nn.Parameter(value, requires_grad=name not in frozen)
            else:
                self.register_buffer(f"fixed-{_key(name)}", value)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> WeightPath:
        # knots of a conv weight are 5-D: convert each knot as the conv's own 4-D weight, so that
        # .to(memory_format=torch.channels_last) formats them as it formats the source's convs
        with float64_kept(self, "times", fn):
            return super()._apply(lambda tensor: _per_knot(fn, tensor), recurse)

    @property
    def count(self) -> int:
        """The number of knots ``m``."""
        return self.times.shape[0]

    def knots(self, name: str) -> Tensor:
        """The knot values of tensor ``name``, shape ``(m, *shape)``."""
        key = _key(name)
        return self.values[key] if key in self.values else self._buffers[f"fixed-{key}"]

    def tensors(self) -> list[Tensor]:
        """The knot tensors (parameters and buffers) and the knot times."""
        return [*(self.knots(name) for name in self.names), self.times]

    def at(
        self, times: Sequence[float], knot_times: Sequence[float] | None = None
    ) -> list[dict[str, Tensor]]:
        """``{name: θ_name(t)}`` at each host time ``t``: a knot's own tensors (views) on a knot,
        else their interpolation, computed once per distinct time.

        ``knot_times``: :attr:`times` already read on the host (else read here, a host sync).
        """
        knots = list(knot_times) if knot_times is not None else self.times.tolist()
        tolerance = 1e-6 * (knots[-1] - knots[0])
        computed: dict[tuple[int, float], dict[str, Tensor]] = {}
        result = []
        for t in times:
            index = max(0, bisect.bisect_right(knots, t + tolerance) - 1)
            weight = 0.0
            if self.interpolation == "linear" and index < len(knots) - 1:
                weight = (t - knots[index]) / (knots[index + 1] - knots[index])
                weight = 0.0 if weight * (knots[index + 1] - knots[index]) <= tolerance else weight
            key = (index, weight)
            if key not in computed:
                computed[key] = {
                    name: self.knots(name)[index]
                    if weight == 0.0
                    else torch.lerp(self.knots(name)[index], self.knots(name)[index + 1], weight)
                    for name in self.names
                }
            result.append(computed[key])
        return result

    def forward(self, t: Tensor) -> dict[str, Tensor]:
        """``{name: θ_name(t)}`` for a 0-d time ``t`` (no host sync, no gradient to ``t``)."""
        t, times = t.detach(), self.times.to(t.device)
        return {
            name: interpolate(self.knots(name), times, t, self.interpolation) for name in self.names
        }


@contextmanager
def float64_kept(module: nn.Module, name: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Around ``module._apply(fn)``: buffer ``name`` (times) follows ``fn``'s device only and
    stays float64, so that casting a model to half precision does not move its grid."""
    value = module._buffers[name]
    yield
    module._buffers[name] = value.to(fn(value.new_empty(0)).device)


def _per_knot(fn: Callable[[Tensor], Tensor], tensor: Tensor) -> Tensor:
    if tensor.dim() != 5:
        return fn(tensor)
    return torch.stack([fn(knot) for knot in tensor.unbind(0)])


class _Branch(nn.Module):
    """Calls an adapter's branch on a block, so that ``functional_call`` can swap its weights."""

    def __init__(self, block: nn.Module, branch: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.block = block
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(self.block, x)


class VectorField(nn.Module):
    """``F(t, x)``: the branch of one block type with weights ``θ(t)`` read from a path.

    Args:
        template: a block of the stage with its step removed (its branch is ``F``); its own
            tensors are never used, only their names and the module's code. It is kept out of
            the module tree (no parameters, no state-dict entries, unaffected by ``.to()`` and
            ``.train()``: its normalisation layers stay in eval mode).
        branch: ``branch(block, x)``: the block type's residual branch.
        post: the post-step map of the stage's blocks (``None``: the identity).
        path: the weights of every block tensor as a function of ``t``.
        scale: factor applied to the branch output (``L / horizon`` when the adapter has no
            layer that carries the ODE-form rescale, else 1).
        fold_pairs: ``(conv, norm)`` submodule names of the template whose BatchNorm is folded
            into the conv when weights are bound for inference (:meth:`bound_branch`); the path
            holds the unfolded tensors, so folding never changes what is interpolated.
    """

    def __init__(
        self,
        template: nn.Module,
        branch: Callable[[nn.Module, Tensor], Tensor],
        post: Callable[[Tensor], Tensor] | None,
        path: WeightPath,
        scale: float = 1.0,
        fold_pairs: Pairs = (),
    ):
        super().__init__()
        template = _Branch(template, branch).eval()
        for parameter in template.parameters():
            parameter.requires_grad_(False)
        object.__setattr__(self, "template", template)
        object.__setattr__(
            self, "post", copy.deepcopy(post) if isinstance(post, nn.Module) else post
        )
        self.path = path
        self.scale = scale
        self.fold_pairs = tuple(fold_pairs)
        self.folds_batchnorm = bool(fold_pairs)
        """Whether the field's BatchNorm is folded: at binding, or in the knots (format 2)."""
        self.prefix = "block."

    def branch_module(self) -> nn.Module:
        """A copy of the branch module sharing the template's tensors, for :meth:`bind`."""
        memo = {id(t): t for t in [*self.template.parameters(), *self.template.buffers()]}
        return copy.deepcopy(self.template, memo)

    def bind(self, module: nn.Module, weights: Mapping[str, Tensor]) -> None:
        """Make ``module`` (from :meth:`branch_module`) compute the branch with ``weights``."""
        for name, tensor in weights.items():
            path, _, leaf = (self.prefix + name).rpartition(".")
            owner = module.get_submodule(path)
            owner._parameters.pop(leaf, None)
            if leaf in owner._buffers:
                owner._buffers[leaf] = tensor
            else:
                setattr(owner, leaf, tensor)

    def bound_branch(self, weights: Mapping[str, Tensor], *, own: bool = False) -> nn.Module:
        """A branch module computing ``F`` with ``weights``, its BatchNorm folded (inference).

        ``own=False``: the module holds ``weights`` themselves (views, no copy before folding);
        ``own=True``: it holds copies as its own parameters and buffers (a standalone module
        that ``.to()``, ``state_dict()`` and graph capture treat as any other). Half-precision
        weights are folded in the template's precision (float32), then cast.
        """
        dtype = next(iter(weights.values())).dtype
        if own or dtype in (torch.float16, torch.bfloat16):
            module = copy.deepcopy(self.template)
            named = {self.prefix + name: tensor for name, tensor in weights.items()}
            module.load_state_dict(named, strict=False)
        else:
            module = self.branch_module()
            self.bind(module, weights)
        if self.fold_pairs:
            with torch.no_grad():
                fold_batchnorm(module.block, self.fold_pairs)
        return module.to(dtype)

    def branch(self, t: Tensor, x: Tensor) -> Tensor:
        """The unprojected field ``F(t, x)``."""
        weights = {self.prefix + name: value for name, value in self.path(t).items()}
        out = functional_call(self.template, weights, (x,), strict=False)
        return out * self.scale if self.scale != 1.0 else out

    def forward(self, t: Tensor, x: Tensor, resolution: Tensor | None = None) -> Tensor:
        """``F(t, x)``, projected at ``resolution`` (the step ``s``; ``None``: limit ``s → 0``)."""
        field = self.branch(t, x)
        if self.post is None:
            return field
        if resolution is not None:
            return (self.post(x + resolution * field) - x) / resolution
        return project(x, field, self.post)

    def extra_repr(self) -> str:
        post = "identity" if self.post is None else getattr(self.post, "__name__", repr(self.post))
        return f"knots={self.path.count}, interpolation={self.path.interpolation}, post={post}"


def project(x: Tensor, field: Tensor, post: Callable[[Tensor], Tensor]) -> Tensor:
    """The projected field for ``post = relu``: ``F`` where ``x > 0``, else ``relu(F)``.

    See ``docs/theory.md``, "Post-activation blocks and the projected field".

    Raises:
        ValueError: ``post`` is not relu (the limit of the projection is only known for relu).
    """
    if not (post in (F.relu, torch.relu) or type(post) is nn.ReLU):
        raise ValueError(
            f"the continuous projected field is only defined for post=relu, got {post!r}; "
            f"use a fixed-grid method, whose field is projected at the solver's step"
        )
    return torch.where(x > 0, field, F.relu(field))
