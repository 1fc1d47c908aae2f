"""An exported neural ODE made a plain PyTorch program, for the deployment toolchain.

:func:`deployable` binds the weights of each stage's fixed grid once: every distinct evaluation
time becomes one branch module holding its own (interpolated, BatchNorm-folded) weights, and
the stage runs the grid's steps over them with Python-float step sizes. What is left is modules
and tensor arithmetic, with no solver, no weight cache and no host sync, so ``torch.export``,
``torch.onnx.export``, ``torch.jit.trace`` and ``torch.compile(fullgraph=True)`` capture it whole.
It computes what the export computes at that method and step count.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from resode_lightning.export.anytime import Steps, ode_stages, set_steps
from resode_lightning.export.grid import GRID_METHODS, grid_step
from resode_lightning.export.solve import NeuralODEStage


class DeployedStage(nn.Module):
    """One stage of an export on its fixed grid, the weights of every evaluation time bound.

    Args:
        stage: a stage of an export whose method is one of :data:`GRID_METHODS`.

    Raises:
        ValueError: the stage's method is not a fixed-grid method integrated on the grid.
    """

    def __init__(self, stage: NeuralODEStage) -> None:
        super().__init__()
        if stage.method not in GRID_METHODS:
            raise ValueError(
                f"stage {stage.stage_name!r} runs {stage.method}, which cannot be deployed as a "
                f"fixed program: use one of the fixed-grid methods {tuple(GRID_METHODS)} "
                f"(deployable(model, method='rk4'))"
            )
        field = stage.field
        self.method = stage.method
        self.steps = stage.steps
        self.step_size = float(stage.horizon) / stage.steps
        self.scale = field.scale
        self.stage_name = stage.stage_name
        fractions = GRID_METHODS[stage.method]
        times = [(k + f) * self.step_size for k in range(stage.steps) for f in fractions]
        modules: list[nn.Module] = []
        position: dict[int, int] = {}
        self.order: list[int] = []
        for weights in field.path.at(times):
            if id(weights) not in position:
                position[id(weights)] = len(modules)
                modules.append(field.bound_branch(weights, own=True))
            self.order.append(position[id(weights)])
        self.branches = nn.ModuleList(modules).requires_grad_(False).eval()
        post = field.post
        if isinstance(post, nn.Module):
            self.post = copy.deepcopy(post)
        else:
            object.__setattr__(self, "post", post)

    def _evaluations(self, k: int) -> list[nn.Module]:
        per_step = len(GRID_METHODS[self.method])
        first = per_step * k
        return [self.branches[i] for i in self.order[first : first + per_step]]

    def forward(self, x: Tensor) -> Tensor:
        for k in range(self.steps):
            branches = self._evaluations(k)
            if self.scale != 1.0:
                branches = [lambda y, b=b: b(y) * self.scale for b in branches]
            x = grid_step(self.method, branches, self.post, self.step_size, x)
        return x

    def extra_repr(self) -> str:
        return f"method={self.method}, steps={self.steps}, branches={len(self.branches)}"


def deployable(
    model: nn.Module, steps: Steps | None = None, method: str | None = None
) -> nn.Module:
    """A copy of an exported model as a plain PyTorch program, ready for graph capture.

    Each stage runs its fixed grid (the export's own, or ``steps``/``method`` as
    :func:`~resode_lightning.set_steps` takes them) with the weights of every evaluation time
    bound once, BatchNorm folded when the export folds it. The copy computes what the export
    computes at that setting, is in eval mode, and does not follow later changes to the
    export's weights: deploy again after training. Its bound weights do not require gradients;
    the layers outside the stages keep theirs.

    Args:
        model: a model returned by :func:`~resode_lightning.export_neural_ode` or
            :func:`~resode_lightning.load_neural_ode` (not modified).
        steps: a budget for every stage (see :func:`~resode_lightning.set_steps`); ``None``
            keeps each stage's steps.
        method: a fixed-grid method (``"euler"``, ``"midpoint"``, ``"rk4"``); ``None`` keeps
            each stage's.

    Returns:
        The deployable model.

    Raises:
        ValueError: ``model`` is no export; a stage would run an adaptive or multistep
            method; an invalid budget.

    Example::

        >>> import torch
        >>> from resode_lightning import export_neural_ode, ode_resnet
        >>> ode = export_neural_ode(ode_resnet(depths=(16,), widths=(8,)).eval())
        >>> fast = deployable(ode, steps=0.25, method="rk4")
        >>> program = torch.export.export(fast, (torch.randn(2, 3, 32, 32),))
    """
    deployed = copy.deepcopy(model).eval()
    if steps is not None or method is not None:
        set_steps(deployed, steps if steps is not None else {}, method)
    ode_stages(deployed)  # raises unless it is an export
    stages = [(p, m) for p, m in deployed.named_modules() if isinstance(m, NeuralODEStage)]
    for path, stage in stages:
        deployed.set_submodule(path, DeployedStage(stage))
    return deployed
