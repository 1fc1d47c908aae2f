"""Thin Lightning adapters over the core: each callback holds no math of its own."""

from resode_lightning.callbacks.ode_form import ODEForm

__all__ = ["ODEForm"]
