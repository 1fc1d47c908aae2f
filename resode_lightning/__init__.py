"""resode_lightning: production ResNets as discretized neural ODEs, for PyTorch Lightning.

The names of ``__all__`` are the promised API, each documented in docs/api.md; the subpackages
are importable but internal: their modules and names may move.
"""

from resode_lightning.callbacks import (
    DepthGrowth,
    DepthSampling,
    NeuralODEExport,
    ODEForm,
    SmoothnessMonitor,
)
from resode_lightning.core.blocks import BlockAdapter, BlockAdapterError
from resode_lightning.core.io.checkpoint import load_state_dict_file
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.core.metrics import smoothness_metrics, smoothness_report
from resode_lightning.core.models import PreActBlock, ode_resnet
from resode_lightning.core.odeform import from_ode_form, is_ode_form, load_into, to_ode_form
from resode_lightning.core.plots import plot_smoothness
from resode_lightning.core.registry import register_block, registered_blocks, registration_scope
from resode_lightning.core.resample import resample_depth
from resode_lightning.core.stages import Stage, find_stages
from resode_lightning.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from resode_lightning.export import (
    Adjoint,
    Backprop,
    Checkpointed,
    DeployedStage,
    ExportOptions,
    PiecewiseConstant,
    PiecewiseLinear,
    RecursiveCheckpointed,
    accuracy_vs_steps,
    at_steps,
    deployable,
    export_neural_ode,
    load_neural_ode,
    save_neural_ode,
    set_steps,
)
from resode_lightning.lit import ImageClassifier
from resode_lightning.lit.distillation import distill_depth

__version__ = "0.1.0"

__all__ = [
    "DeployedStage",
    "BlockAdapter",
    "BlockAdapterError",
    "CIFAR10DataModule",
    "CheckpointError",
    "DepthGrowth",
    "DepthSampling",
    "DigitsDataModule",
    "ExportOptions",
    "Adjoint",
    "Backprop",
    "Checkpointed",
    "PiecewiseConstant",
    "PiecewiseLinear",
    "RecursiveCheckpointed",
    "ImageClassifier",
    "ImageFolderDataModule",
    "NeuralODEExport",
    "ODEForm",
    "PreActBlock",
    "Stage",
    "accuracy_vs_steps",
    "at_steps",
    "deployable",
    "distill_depth",
    "export_neural_ode",
    "find_stages",
    "from_ode_form",
    "is_ode_form",
    "load_into",
    "load_neural_ode",
    "load_state_dict_file",
    "ode_resnet",
    "register_block",
    "registered_blocks",
    "registration_scope",
    "resample_depth",
    "save_neural_ode",
    "set_steps",
    "plot_smoothness",
    "smoothness_metrics",
    "smoothness_report",
    "SmoothnessMonitor",
    "to_ode_form",
]
