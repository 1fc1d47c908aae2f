"""Depth sampling
==============

Trains one set of weights to be right at every number of steps: every training batch runs at
full depth and at the other step counts of a set (the sandwich rule of slimmable networks).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.core.budget import MAX_STEPS, check_steps, steps_per_stage
from resode_lightning.core.coarse import BatchStatistics, check_coarse, coarse_steps
from resode_lightning.core.stages import Stage, find_stages


class DepthSampling(Callback):
    r"""Train every batch at full depth and at the other step counts of ``steps``.

    A stage of ``L`` blocks in ODE form is the Euler discretisation of a field whose weights
    follow the path through its blocks. Every training batch runs the module's own
    ``training_step`` at full depth, then again with every stage at ``n < L`` Euler steps of
    that path for each ``n`` of ``steps`` (or for ``draws`` of them drawn per batch):
    :func:`~resode_lightning.core.coarse.coarse_steps` runs the blocks a step starts on with
    step ``horizon / n``, weights interpolated differentiably between neighbours when a step
    starts between blocks, and skips the others. The losses are summed. The full-depth pass on
    every batch keeps full-depth accuracy, which one drawn count per batch loses. The export
    then runs at each of these counts with :func:`~resode_lightning.export.anytime.set_steps`
    and computes what was trained.

    BatchNorm: the full-depth pass normalises with batch statistics and updates the running
    statistics as usual; the fewer-step passes normalise block by block with the statistics of
    the full-depth pass on the same batch, differentiably (so it keeps BatchNorm's invariance
    to the scale of the weights), and update nothing. Every step count is thus trained with
    full-depth statistics, the only ones the exported field folds in: one set of running
    statistics serves all of them, with no recalibration.

    A count applies to every stage; draws come from a generator seeded by ``seed``, the epoch
    and the batch index (reproducible, the same on every rank, resumable). What the fewer-step
    calls of ``training_step`` log is dropped (logged values are the full-depth pass's); metric
    objects they update see every pass. Stages must be in ODE form when fitting starts
    (``ODEForm`` before this callback, or an ``ode_resnet``), with affine BatchNorms if any.
    Automatic optimisation only.

    Args:
        steps: step counts: fractions of each stage's depth in ``(0, 1]``
            (``n = max(1, ⌊f · L⌋)``) or ints (at most the shallowest stage's depth). Full
            depth runs on every batch whether listed or not.
        draws: how many of the fewer-step counts run per batch, drawn uniformly without
            replacement (``None``: all of them; ``1`` costs less per batch, and measured lower
            accuracy at every count).
        seed: seed of the draws.

    Raises:
        ValueError: at construction, for empty or invalid ``steps`` or ``draws``; when fitting
            starts, for manual optimisation, a module without residual stages, a stage not in
            ODE form or whose step cannot be changed, a non-affine BatchNorm in a stage, or an
            int step count above a stage's depth.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from resode_lightning import DepthSampling, ODEForm
        >>> trainer = Trainer(callbacks=[ODEForm(), DepthSampling(steps=(1.0, 0.5, 0.25))])
    """

    def __init__(
        self,
        steps: Sequence[float | int] = (1.0, 0.5, 0.25),
        draws: int | None = None,
        seed: int = 0,
    ) -> None:
        steps = tuple(steps)
        if not steps or not all(_valid_step(s) for s in steps):
            raise ValueError(
                f"DepthSampling(steps=...) must be fractions in (0, 1] or ints in [1, "
                f"{MAX_STEPS:,}], got {steps!r}"
            )
        if draws is not None and (
            isinstance(draws, bool) or not isinstance(draws, int) or draws < 1
        ):
            raise ValueError(
                f"DepthSampling(draws=...) must be a positive int or None, got {draws!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"DepthSampling(seed=...) must be an int, got {seed!r}")
        self.steps = steps
        self.draws = draws
        self.seed = seed
        self._stages: list[Stage] = []
        self._statistics: BatchStatistics | None = None

    def counts(self, stage: Stage) -> list[int]:
        """The step counts of ``steps`` for ``stage``."""
        depth = {stage.name: stage.depth}
        return [steps_per_stage(s, depth, depth)[stage.name] for s in self.steps]

    def draw(self, epoch: int, batch_idx: int) -> list[int]:
        """The indices in ``steps`` of the fewer-step passes of a batch."""
        candidates = [
            i
            for i in range(len(self.steps))
            if any(self.counts(stage)[i] < stage.depth for stage in self._stages)
        ]
        if self.draws is None or self.draws >= len(candidates):
            return candidates
        chosen = random.Random(f"{self.seed}:{epoch}:{batch_idx}").sample(candidates, self.draws)
        return sorted(chosen)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("DepthSampling needs automatic optimisation (two losses per batch)")
        try:
            stages = find_stages(pl_module)
        except ValueError as error:
            raise ValueError(f"DepthSampling: {error}") from None
        for stage in stages:
            check_coarse(stage)
            too_deep = [n for n in self.counts(stage) if n > stage.depth]
            if too_deep:
                raise ValueError(
                    f"DepthSampling: steps {too_deep} exceed the depth {stage.depth} of stage "
                    f"{stage.name!r}; give fractions, or ints up to the shallowest stage's depth"
                )
        norms = [m for s in stages for b in s.blocks for m in b.modules()]
        self._statistics = BatchStatistics([m for m in norms if isinstance(m, _BatchNorm)])
        self._stages = stages
        sandwich = _Sandwich(pl_module.training_step, self, trainer, pl_module)

        def training_step(batch: Any, batch_idx: int, *args: Any) -> Any:
            return sandwich(batch, batch_idx, *args)

        training_step.sandwich = sandwich  # type: ignore[attr-defined]
        pl_module.training_step = training_step

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        if hasattr(pl_module.__dict__.get("training_step"), "sandwich"):
            del pl_module.training_step
        self._stages, self._statistics = [], None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stages": [], "_statistics": None}


class _Sandwich:
    """``training_step`` at full depth plus ``training_step`` at each fewer-step count."""

    def __init__(
        self, step: Callable[..., Any], sampling: DepthSampling, trainer: Any, module: nn.Module
    ) -> None:
        self.step, self.sampling, self.trainer, self.module = step, sampling, trainer, module

    def __call__(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        sampling = self.sampling
        with sampling._statistics as statistics:
            full = self.step(batch, batch_idx, *args)
        if full is None:
            return None
        loss = full["loss"] if isinstance(full, dict) else full
        for index in sampling.draw(self.trainer.current_epoch, batch_idx):
            with ExitStack() as stack:
                for stage in sampling._stages:
                    count = sampling.counts(stage)[index]
                    stack.enter_context(coarse_steps(stage, count, statistics.values))
                self.module.log = self.module.log_dict = _ignore  # the full-depth pass's logs
                try:
                    coarse = self.step(batch, batch_idx, *args)
                finally:
                    del self.module.log, self.module.log_dict
            if coarse is not None:
                loss = loss + (coarse["loss"] if isinstance(coarse, dict) else coarse)
        statistics.values = {}
        return {**full, "loss": loss} if isinstance(full, dict) else loss


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands for ``LightningModule.log`` in the fewer-step pass."""


def _valid_step(step: object) -> bool:
    try:
        check_steps(step)
    except ValueError:
        return False
    return isinstance(step, int) or step <= 1
