"""Neural ODE export: residual stages as vector fields with weights continuous in depth.

Internal: the promised API is the top-level ``resode_lightning``; names here may move.
"""

from resode_lightning.core.budget import Steps
from resode_lightning.export.anytime import accuracy_vs_steps, at_steps, set_steps
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.deploy import DeployedStage, deployable
from resode_lightning.export.field import VectorField, WeightPath
from resode_lightning.export.options import (
    Adjoint,
    Backprop,
    Checkpointed,
    ExportOptions,
    PiecewiseConstant,
    PiecewiseLinear,
    RecursiveCheckpointed,
)
from resode_lightning.export.serialization import load_neural_ode, save_neural_ode
from resode_lightning.export.solve import NeuralODEStage
from resode_lightning.export.solvers import METHODS, Solver

__all__ = [
    "METHODS",
    "Adjoint",
    "Backprop",
    "Checkpointed",
    "DeployedStage",
    "ExportOptions",
    "NeuralODEStage",
    "PiecewiseConstant",
    "PiecewiseLinear",
    "RecursiveCheckpointed",
    "Solver",
    "Steps",
    "VectorField",
    "WeightPath",
    "accuracy_vs_steps",
    "at_steps",
    "deployable",
    "export_neural_ode",
    "load_neural_ode",
    "save_neural_ode",
    "set_steps",
]
