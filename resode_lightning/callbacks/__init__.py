"""Thin Lightning adapters over the core: each callback holds no math of its own.

Internal: the promised API is the top-level ``resode_lightning``; names here may move.
"""

from resode_lightning.callbacks.depth_growth import DepthGrowth
from resode_lightning.callbacks.depth_sampling import DepthSampling
from resode_lightning.callbacks.neural_ode_export import NeuralODEExport
from resode_lightning.callbacks.ode_form import ODEForm
from resode_lightning.callbacks.smoothness_monitor import SmoothnessMonitor

__all__ = ["DepthGrowth", "DepthSampling", "NeuralODEExport", "ODEForm", "SmoothnessMonitor"]
