"""Depth sampling
==============

Trains one set of weights to be right at every number of steps: each training batch runs the
residual stages at a step count drawn from a set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from typing_extensions import override

from resode_lightning._lightning import Callback
from resode_lightning.core.coarse import check_coarse, coarse_steps
from resode_lightning.core.stages import Stage, find_stages


class DepthSampling(Callback):
    r"""Run every residual stage at a step count drawn per training batch from ``steps``.

    A stage of ``L`` blocks in ODE form is the Euler discretisation of a field whose weights
    follow the path through its blocks; drawn ``n < L`` steps, the stage computes the Euler
    steps of that path at ``n`` steps (:func:`~resode_lightning.core.coarse.coarse_steps`):
    the blocks a step starts on run with step ``horizon / n`` (weights interpolated between
    neighbours when a step starts between blocks, differentiably), the others are skipped. The
    export then runs at any of these step counts with
    :func:`~resode_lightning.export.anytime.set_steps` and computes what was trained.

    BatchNorm: full-depth batches normalise with batch statistics and update the running
    statistics as usual; fewer-step batches normalise with those running statistics and leave
    them unchanged, so every step count trains with the normalisation the exported field
    folds in, one set of statistics for all of them. Validation runs at full depth.

    The draw is one fraction for all stages per batch, from a generator seeded by ``seed``, the
    epoch and the batch index (reproducible, the same on every rank, resumable). Skipped blocks
    get no gradient: under DDP use ``strategy="ddp_find_unused_parameters_true"``. Stages must be
    in ODE form by the time fitting starts (``ODEForm`` before this callback, or an
    ``ode_resnet``).

    Args:
        steps: the step counts drawn from: fractions of each stage's depth in ``(0, 1]``
            (``n = max(1, round(f * L))``) or ints (at most the shallowest stage's depth).
        weights: relative probabilities of ``steps`` (default: uniform).
        seed: seed of the draws.

    Raises:
        ValueError: at construction, for empty or invalid ``steps`` or ``weights``; when fitting
            starts, when the module holds no residual stage, a stage is not in ODE form or its
            step cannot be changed, or an int step count exceeds a stage's depth.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from resode_lightning import DepthSampling, ODEForm
        >>> trainer = Trainer(callbacks=[ODEForm(), DepthSampling(steps=(1.0, 0.5, 0.25))])
    """

    def __init__(
        self,
        steps: Sequence[float | int] = (1.0, 0.5, 0.25),
        weights: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        steps = tuple(steps)
        if not steps or not all(_valid_step(s) for s in steps):
            raise ValueError(
                f"DepthSampling(steps=...) must be fractions in (0, 1] or positive ints, got "
                f"{steps!r}"
            )
        if weights is not None:
            weights = tuple(weights)
            valid = all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights
            )
            if len(weights) != len(steps) or not valid or not sum(weights) > 0:
                raise ValueError(
                    f"DepthSampling(weights=...) must be {len(steps)} non-negative numbers with a "
                    f"positive sum, got {weights!r}"
                )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"DepthSampling(seed=...) must be an int, got {seed!r}")
        self.steps = steps
        self.weights = weights
        self.seed = seed
        self._stages: list[Stage] = []
        self._active = ExitStack()

    def counts(self, stage: Stage) -> list[int]:
        """The step counts of ``steps`` for ``stage``."""
        return [s if isinstance(s, int) else max(1, round(s * stage.depth)) for s in self.steps]

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
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
        self._stages = stages

    @override
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._restore()
        draw = random.Random(f"{self.seed}:{trainer.current_epoch}:{batch_idx}")
        index = draw.choices(range(len(self.steps)), weights=self.weights)[0]
        for stage in self._stages:
            self._active.enter_context(coarse_steps(stage, self.counts(stage)[index]))

    @override
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # the forward is done: other callbacks see the stages as they are
        self._restore()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._restore()

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
        self._stages = []

    def _restore(self) -> None:
        self._active.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stages"], state["_active"] = [], ExitStack()
        return state


def _valid_step(step: object) -> bool:
    if isinstance(step, bool):
        return False
    if isinstance(step, int):
        return step >= 1
    return isinstance(step, float) and 0 < step <= 1
