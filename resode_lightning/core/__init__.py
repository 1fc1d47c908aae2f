"""Pure PyTorch core: stages, ODE form, weight paths, smoothness metrics, models, file I/O.

Nothing here imports Lightning.
"""

from resode_lightning.core.history import Measurement, SmoothnessHistory

__all__ = ["Measurement", "SmoothnessHistory"]
