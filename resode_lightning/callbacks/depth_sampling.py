"""Depth sampling
==============

Trains one set of weights to be right at every number of steps, and optionally with every
fixed-grid solver: the model's full-depth forward of each training batch is followed by its
forwards at the other settings on the same inputs (the sandwich rule of slimmable networks),
their losses attached to the full-depth output.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from os.path import commonprefix
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.callbacks.depth_passes import (
    attach_loss,
    label_cross_entropy,
    roughness,
    running_statistics_kept,
    stage_at_steps,
    stage_horizon,
    stage_weights,
)
from resode_lightning.core.budget import MAX_STEPS, check_steps, steps_per_stage
from resode_lightning.core.coarse import BatchStatistics, Statistics, check_coarse
from resode_lightning.core.stages import Stage, find_stages
from resode_lightning.export.anytime import at_steps, ode_stages
from resode_lightning.export.grid import GRID_METHODS
from resode_lightning.export.solve import NeuralODEStage

Loss = Callable[[Any, Any, Any], Tensor]
"""``loss(output, full_output, batch)``: the loss of one fewer-step pass, a 0-d tensor."""


class DepthSampling(Callback):
    r"""Train every batch at full depth and at the other step counts (and solvers) of a set.

    A stage of ``L`` blocks in ODE form is the Euler discretisation of a field whose weights
    follow the path through its blocks. In every training batch, the first call of the model
    with gradients (the one ``training_step`` makes) runs at full depth as usual; then, within
    that call, the model runs again on the same inputs with every stage at each setting of
    ``steps`` × ``methods`` (or ``draws`` of them drawn per batch): ``n < L`` Euler steps of
    the weight path, and each other fixed-grid method (``rk4``, ``midpoint``) at the same
    number of field evaluations (``max(1, n // evaluations per step)`` steps; ``L``
    included), computed by the blocks themselves with their weights interpolated
    differentiably where an evaluation falls between two. (An export's stages count ``n``
    steps of their own method instead of Euler's.) Each pass's loss,
    ``loss(output, full_output, batch)`` times its weight, and the ``roughness`` penalty are
    attached to the returned full-depth output: what backpropagates through it (the module's
    own loss) backpropagates them too, scaled as Lightning scales that loss (gradient
    accumulation, the AMP loss scale). The LightningModule's code is left as it is (the
    callback uses PyTorch forward hooks); its logged values and metrics are the full-depth
    pass's, and each pass's loss is logged as ``depth_sampling/<method>@<steps>`` (and the
    penalty as ``depth_sampling/roughness``). An exported model (its stages
    :class:`~resode_lightning.export.solve.NeuralODEStage`) is run at the settings with
    :func:`~resode_lightning.export.anytime.at_steps` (how ``distill_depth`` trains).

    Solvers: Euler-only training makes a good multi-resolution Euler scheme whose weights may
    end rough in depth, so that higher-order solvers are wrong at the same evaluations.
    ``methods=("euler", "rk4")`` trains RK4 directly; on the digits benchmark's tied
    ``ode_resnet`` (L = 16, 3 seeds, ``benchmarks/results/anytime_solvers.md``) it took RK4 at
    L/4 evaluations from 73.7 % to 96.7 % (Euler L: 96.9 %), Euler unharmed, for about twice
    the training time. ``roughness=λ`` adds ``λ`` times, per stage, the squared
    ``roughness_order``-th difference of the blocks' weights across depth relative to their
    size (:func:`~resode_lightning.callbacks.depth_passes.roughness`), at little cost; alone,
    it did not make RK4 right there (77.3 % at λ = 1e-3, 91.1 % at 1e-2 on one seed).

    BatchNorm: the full-depth pass normalises with batch statistics and updates the running
    statistics as usual; in the other passes the stages' BatchNorms normalise block by block
    with the statistics of the full-depth pass on the same batch, differentiably, and no
    BatchNorm of the model updates its running statistics. One set of running statistics thus
    serves every setting, the only one the exported field folds in.

    Draws come from a generator seeded by ``seed``, the epoch and the batch index
    (reproducible, the same on every rank, resumable). Stages must be in ODE form when fitting
    starts (``ODEForm`` before this callback, or an ``ode_resnet``), with affine BatchNorms if
    any. Automatic optimisation only; the model's first call with gradients per batch carries
    the passes (a second call, for another view, does not).

    Args:
        steps: step counts: fractions of each stage's depth in ``(0, 1]``
            (``n = max(1, ⌊f · L⌋)``) or ints (at most the shallowest stage's depth). Full
            depth runs on every batch whether listed or not.
        draws: how many of the other settings run per batch, drawn uniformly without
            replacement (``None``: all of them).
        seed: seed of the draws.
        methods: fixed-grid methods of :data:`~resode_lightning.export.grid.GRID_METHODS`;
            each count of ``steps`` runs with each of them at the same number of field
            evaluations. ``("euler", "rk4")`` trains the net to be right under both.
        weights: the weight of each entry of ``steps`` (its passes under every method),
            finite and ``>= 0`` (``None``: 1 each). The module's own full-depth pass keeps
            the weight the module gives its loss.
        loss: the loss of a pass (``None``: the cross-entropy on the labels ``batch[1]``,
            :func:`~resode_lightning.callbacks.depth_passes.label_cross_entropy`; without
            labels, :func:`~resode_lightning.callbacks.depth_passes.inplace_distillation`, the
            KL divergence to the full-depth output's softmax, measured 3.5 points lower at L
            on the digits benchmark).
        roughness: weight ``λ >= 0`` of the roughness penalty in depth (0: none).
        roughness_order: 1 (first differences of the weights across depth) or 2 (second).

    Raises:
        ValueError: at construction, for an invalid argument; when fitting starts, for manual
            optimisation, a module without residual stages, a stage not in ODE form or whose
            step cannot be changed, a non-affine BatchNorm in a stage, an int step count above
            a stage's depth, or DeepSpeed's fp16 loss scaling; at the first training batch,
            when ``training_step`` makes no call of the model with gradients.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from resode_lightning import DepthSampling, ODEForm
        >>> sampling = DepthSampling(steps=(1.0, 0.5, 0.25), methods=("euler", "rk4"))
        >>> trainer = Trainer(callbacks=[ODEForm(), sampling])
    """

    def __init__(
        self,
        steps: Sequence[float | int] = (1.0, 0.5, 0.25),
        draws: int | None = None,
        seed: int = 0,
        *,
        methods: Sequence[str] = ("euler",),
        weights: Sequence[float] | None = None,
        loss: Loss | None = None,
        roughness: float = 0.0,
        roughness_order: int = 1,
    ) -> None:
        steps, methods = tuple(steps), tuple(methods)
        if not steps or not all(_valid_step(s) for s in steps):
            raise ValueError(
                f"DepthSampling(steps=...) must be fractions in (0, 1] or ints in [1, "
                f"{MAX_STEPS:,}], got {steps!r}"
            )
        if draws is not None and (_not_int(draws) or draws < 1):
            raise ValueError(
                f"DepthSampling(draws=...) must be a positive int or None, got {draws!r}"
            )
        if _not_int(seed):
            raise ValueError(f"DepthSampling(seed=...) must be an int, got {seed!r}")
        if not methods or len(set(methods)) < len(methods) or not set(methods) <= set(GRID_METHODS):
            raise ValueError(
                f"DepthSampling(methods=...) must name distinct fixed-grid methods of "
                f"{tuple(GRID_METHODS)}, got {methods!r}"
            )
        if weights is not None and (
            len(weights) != len(steps) or not all(_real(w) and w >= 0 for w in weights)
        ):
            raise ValueError(
                f"DepthSampling(weights=...) must give one finite weight >= 0 per entry of "
                f"steps {steps!r}, got {weights!r}"
            )
        if loss is not None and not callable(loss):
            raise ValueError(f"DepthSampling(loss=...) must be callable or None, got {loss!r}")
        if not (_real(roughness) and roughness >= 0):
            raise ValueError(
                f"DepthSampling(roughness=...) must be a finite number >= 0, got {roughness!r}"
            )
        if roughness_order not in (1, 2) or isinstance(roughness_order, bool):
            raise ValueError(
                f"DepthSampling(roughness_order=...) must be 1 or 2, got {roughness_order!r}"
            )
        self.steps, self.draws, self.seed, self.methods = steps, draws, seed, methods
        self.weights = tuple(float(w) for w in weights) if weights is not None else None
        self.loss, self.roughness, self.roughness_order = loss, roughness, roughness_order
        self._reset()

    def _reset(self) -> None:
        self._stages: list[Any] = []
        self._horizons: list[float] = []
        self._settings: list[tuple[str, float, str, dict[str, int]]] = []
        self._statistics: BatchStatistics | None = None
        self._norms: list[_BatchNorm] = []
        self._handles: list[Any] = []
        self._model: nn.Module | None = None
        self._plan: list[int] = []
        self._batch: Any = None
        self._armed, self._running, self._owner = False, False, None
        self._scale: Callable[[Tensor], Tensor] = _identity
        self._logged: dict[str, Tensor] = {}

    def settings(self) -> list[tuple[str, float, str, dict[str, int]]]:
        """The passes besides full depth: ``(label, weight, method, {stage: steps})``, in the
        order of ``steps`` then ``methods`` (set when fitting starts; a setting repeating an
        earlier one is left out)."""
        return list(self._settings)

    def draw(self, epoch: int, batch_idx: int) -> list[int]:
        """The indices in :meth:`settings` of the passes of a batch."""
        candidates = list(range(len(self._settings)))
        if self.draws is None or self.draws >= len(candidates):
            return candidates
        chosen = random.Random(f"{self.seed}:{epoch}:{batch_idx}").sample(candidates, self.draws)
        return sorted(chosen)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("DepthSampling needs automatic optimisation (losses per batch)")
        precision = type(trainer.precision_plugin).__name__
        if precision == "DeepSpeedPrecision" and "16" in str(trainer.precision).replace("bf16", ""):
            raise ValueError(
                "DepthSampling cannot scale its losses as DeepSpeed's fp16 loss scaling does; "
                "use precision='bf16-mixed' or 32"
            )
        exported = ode_stages(pl_module) if _has_ode_stages(pl_module) else {}
        if exported:
            self._stages = list(exported.values())
            depths = {name: stage.source_depth for name, stage in exported.items()}
            current = {name: (stage.method, stage.steps) for name, stage in exported.items()}
            odd = {n: m for n, (m, steps) in current.items() if m not in GRID_METHODS or not steps}
            if odd:
                raise ValueError(
                    f"DepthSampling: stages {odd} of the export run no fixed-grid method of "
                    f"{tuple(GRID_METHODS)}; set one first (set_steps(model, 1.0, 'euler'))"
                )
        else:
            self._stages = self._raw_stages(pl_module)
            depths = {stage.name: stage.depth for stage in self._stages}
            current = {stage.name: ("euler", stage.depth) for stage in self._stages}
            norms = [m for s in self._stages for b in s.blocks for m in b.modules()]
            self._statistics = BatchStatistics([m for m in norms if isinstance(m, _BatchNorm)])
        self._settings = self._enumerate(depths, current)
        self._horizons = [stage_horizon(stage) for stage in self._stages]  # no sync per batch
        if self.roughness and all(p is None for p in self._penalties()):
            raise ValueError(
                f"DepthSampling(roughness_order={self.roughness_order}) needs stages of at "
                f"least {self.roughness_order + 1} blocks"
            )
        self._model = pl_module
        self._norms = [m for m in pl_module.modules() if isinstance(m, _BatchNorm)]
        targets = self._stages if exported else [stage.container for stage in self._stages]
        for module in _chain(pl_module, targets):
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))

    def _raw_stages(self, pl_module: nn.Module) -> list[Stage]:
        try:
            stages = find_stages(pl_module)
        except ValueError as error:
            raise ValueError(f"DepthSampling: {error}") from None
        for stage in stages:
            check_coarse(stage)
        return stages

    def _enumerate(
        self, depths: dict[str, int], current: dict[str, tuple[str, int]]
    ) -> list[tuple[str, float, str, dict[str, int]]]:
        """Every setting but the model's own one, and repeats: a count ``n`` of ``steps`` is
        ``n`` steps of each stage's own method (Euler for blocks), and each method of
        ``methods`` runs as many steps as take the same field evaluations (at least one)."""
        own = {name: len(GRID_METHODS[method]) for name, (method, _) in current.items()}
        settings, seen = [], {tuple(current.items())}
        for index, entry in enumerate(self.steps):
            counts = steps_per_stage(entry, depths, depths)
            too_deep = {name: n for name, n in counts.items() if n > depths[name]}
            if too_deep:
                raise ValueError(
                    f"DepthSampling: steps {entry} would exceed the depth of stages "
                    f"{too_deep}; give fractions, or ints up to the shallowest stage's depth"
                )
            weight = 1.0 if self.weights is None else self.weights[index]
            for method in self.methods:
                per_step = len(GRID_METHODS[method])
                steps = {name: max(1, n * own[name] // per_step) for name, n in counts.items()}
                key = tuple((name, (method, n)) for name, n in steps.items())
                if key not in seen:
                    seen.add(key)
                    settings.append((f"{method}@{entry:g}", weight, method, steps))
        return settings

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._plan = self.draw(trainer.current_epoch, batch_idx)
        self._armed = bool(self._plan) or self.roughness > 0
        self._batch, self._logged = batch, {}
        self._scale = _loss_scale(trainer)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self._armed:
            self._disarm()
            raise ValueError(
                f"DepthSampling: {type(pl_module).__name__}.training_step made no call of the "
                f"model with gradients, which the fewer-step passes run on; call the model "
                f"(self(x), or the module holding the stages) in training_step"
            )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._disarm()
        for label, value in self._logged.items():
            pl_module.log(f"depth_sampling/{label}", value, on_step=True, on_epoch=True)
        self._logged, self._batch = {}, None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._disarm()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._disarm()
        for handle in self._handles:
            handle.remove()
        self._reset()

    def _disarm(self) -> None:
        self._armed, self._owner, self._running = False, None, False
        if self._statistics is not None:
            self._statistics.__exit__(None, None, None)
            self._statistics.values = {}

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._armed and self._owner is None and not self._running and torch.is_grad_enabled():
            self._owner = module
            if self._statistics is not None:
                self._statistics.__enter__()

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if module is not self._owner:
            return None
        self._owner, self._armed = None, False
        if self._statistics is not None:
            self._statistics.__exit__(None, None, None)
        statistics = self._statistics.values if self._statistics is not None else None
        terms = []
        self._running = True
        try:
            for index in self._plan:
                label, weight, method, steps = self._settings[index]
                with self._at(method, steps, statistics), running_statistics_kept(self._norms):
                    pass_output = module(*args, **kwargs)
                loss = (self.loss or label_cross_entropy)(pass_output, output, self._batch)
                if not (isinstance(loss, Tensor) and loss.dim() == 0):
                    raise ValueError(
                        f"DepthSampling(loss=...) must return a 0-d tensor, got "
                        f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}"
                    )
                self._logged[label] = loss.detach()
                terms.append(weight * loss.float())
        finally:
            self._running = False
            if self._statistics is not None:
                self._statistics.values = {}
        if self.roughness:
            penalty = sum(p for p in self._penalties() if p is not None)
            self._logged["roughness"] = penalty.detach()
            terms.append(self.roughness * penalty.float())
        return attach_loss(output, self._scale(torch.stack(terms).sum())) if terms else None

    @contextmanager
    def _at(self, method: str, steps: dict[str, int], statistics: Statistics | None) -> Iterator:
        """Every stage at ``steps`` of ``method`` inside the ``with`` block."""
        if self._statistics is None:  # an export
            with at_steps(self._model, steps, method):
                yield
            return
        with ExitStack() as stack:
            for stage in self._stages:
                stack.enter_context(stage_at_steps(stage, method, steps[stage.name], statistics))
            yield

    def _penalties(self) -> list[Tensor | None]:
        return [
            roughness(stage_weights(stage), horizon, self.roughness_order)
            for stage, horizon in zip(self._stages, self._horizons, strict=True)
        ]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in list(state):
            if key.startswith("_"):
                del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()


def _chain(root: nn.Module, targets: Sequence[nn.Module]) -> list[nn.Module]:
    """``root`` and the modules from it down to the deepest one holding every target: the
    candidates for the call of the model that ``training_step`` makes."""
    paths = {id(module): name for name, module in root.named_modules()}
    names = [paths[id(target)].split(".") if paths[id(target)] else [] for target in targets]
    common = commonprefix(names)
    return [root] + [root.get_submodule(".".join(common[:i])) for i in range(1, len(common) + 1)]


def _has_ode_stages(module: nn.Module) -> bool:
    return any(isinstance(m, NeuralODEStage) for m in module.modules())


def _loss_scale(trainer: pl.Trainer) -> Callable[[Tensor], Tensor]:
    """What Lightning does to the module's loss before backward: divide it by the accumulated
    batches, and multiply it by the AMP loss scale (on the device, no host sync)."""
    accumulate = trainer.accumulate_grad_batches
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return (lambda loss: loss / accumulate) if accumulate > 1 else _identity
    return lambda loss: scaler.scale(loss) / accumulate


def _identity(loss: Tensor) -> Tensor:
    return loss


def _valid_step(step: object) -> bool:
    try:
        check_steps(step)
    except ValueError:
        return False
    return isinstance(step, int) or step <= 1


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _real(value: object) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)
