"""Built-in block adapters: torchvision's ResNet and RegNet blocks, timm's ResNet families
(``timm_resnets``) and its RegNet and ByobNet blocks (``timm_regnet_byobnet``).

torchvision's are registered on import. timm's are registered the first time stages are
looked for after ``timm`` has been imported, so that importing this package never imports timm.
"""

from __future__ import annotations

import sys

from resode_lightning.core.adapters import inferred as _inferred  # noqa: F401  (infers)
from resode_lightning.core.adapters import torchvision as _torchvision  # noqa: F401  (registers)

_timm_registered = False


def register_timm_if_imported() -> None:
    """Register the timm adapters once ``timm`` is in ``sys.modules`` (a no-op otherwise)."""
    global _timm_registered
    if _timm_registered or "timm" not in sys.modules:
        return
    _timm_registered = True
    from resode_lightning.core.adapters import (
        timm_regnet_byobnet,  # noqa: F401  (registers)
        timm_resnets,  # noqa: F401  (registers)
    )
