"""Pure PyTorch core: everything the package computes, with no Lightning.

Internal: the promised API is the top-level ``resode_lightning``; names here may move. The
modules (the callbacks, the CLI and the export build on these):

- ``blocks``, ``registry``, ``verification``: block adapters (:func:`register_block`,
  :func:`registered_blocks`, :func:`registration_scope`, :class:`BlockAdapterError`), their table
  and their checks; ``adapters/``: the built-in and inferred ones.
- ``stages``: :class:`Stage` and :func:`find_stages`, runs of residual blocks in any container.
- ``odeform``: :func:`to_ode_form`, :func:`from_ode_form`, :func:`is_ode_form`,
  :func:`load_into`: the rescale, its inverse and loading in either form; ``resample``:
  :func:`resample_depth`; ``optimizer_state``: optimizer state carried across the rescale.
- ``paths``: weights as functions of depth (knot times, interpolation, least-squares knots).
- ``coarse``: a stage run at fewer steps, differentiably, with full-depth BatchNorm statistics.
- ``metrics``: :func:`smoothness_metrics`, :func:`smoothness_report`, :func:`metric_table`,
  :func:`depth_consistency`.
- ``watch``: :func:`watch_stages`, stages whose tensors are read once while training.
- ``history``: :class:`SmoothnessHistory`, a run's measurements; ``plots``: their figures.
- ``models``: :func:`ode_resnet` and :class:`PreActBlock`.
- ``io``: the safe reader (:func:`load_state_dict_file`, :class:`CheckpointError`) and atomic
  writes (:func:`atomic_save`, :func:`atomic_write`).
"""

from resode_lightning.core.blocks import BlockAdapterError
from resode_lightning.core.history import Measurement, SmoothnessHistory
from resode_lightning.core.io.atomic import atomic_save, atomic_write
from resode_lightning.core.io.checkpoint import load_state_dict_file
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.core.metrics import (
    depth_consistency,
    metric_table,
    smoothness_metrics,
    smoothness_report,
)
from resode_lightning.core.models import PreActBlock, ode_resnet
from resode_lightning.core.odeform import from_ode_form, is_ode_form, load_into, to_ode_form
from resode_lightning.core.registry import register_block, registered_blocks, registration_scope
from resode_lightning.core.resample import resample_depth
from resode_lightning.core.stages import Stage, find_stages
from resode_lightning.core.watch import WatchedStage, watch_stages

__all__ = [
    "BlockAdapterError",
    "CheckpointError",
    "Measurement",
    "PreActBlock",
    "SmoothnessHistory",
    "Stage",
    "WatchedStage",
    "atomic_save",
    "atomic_write",
    "depth_consistency",
    "find_stages",
    "from_ode_form",
    "is_ode_form",
    "load_into",
    "load_state_dict_file",
    "metric_table",
    "ode_resnet",
    "register_block",
    "registered_blocks",
    "registration_scope",
    "resample_depth",
    "smoothness_metrics",
    "smoothness_report",
    "to_ode_form",
    "watch_stages",
]
