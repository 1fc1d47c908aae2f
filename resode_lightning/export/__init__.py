"""Neural ODE export: residual stages as vector fields with weights continuous in depth."""

from resode_lightning.core.budget import Steps
from resode_lightning.export.anytime import accuracy_vs_steps, at_steps, set_steps
from resode_lightning.export.build import export_neural_ode
from resode_lightning.export.deploy import DeployedStage, deployable
from resode_lightning.export.distill import distill_depth
from resode_lightning.export.field import VectorField, WeightPath
from resode_lightning.export.options import ExportOptions
from resode_lightning.export.serialization import load_neural_ode, save_neural_ode
from resode_lightning.export.solve import NeuralODEStage

__all__ = [
    "DeployedStage",
    "ExportOptions",
    "NeuralODEStage",
    "Steps",
    "VectorField",
    "WeightPath",
    "accuracy_vs_steps",
    "at_steps",
    "deployable",
    "distill_depth",
    "export_neural_ode",
    "load_neural_ode",
    "save_neural_ode",
    "set_steps",
]
