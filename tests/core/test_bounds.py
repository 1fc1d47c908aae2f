"""Every bound holds where a step count, a horizon or an interval is given (issue 21)."""

from __future__ import annotations

import pytest
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from torchvision.models import resnet18

from resode_lightning import (
    DepthSampling,
    SmoothnessMonitor,
    ode_resnet,
    resample_depth,
    to_ode_form,
)


@pytest.mark.parametrize("horizon", [True, False, float("nan"), float("inf"), 0, -1.0, "1"])
def test_to_ode_form_refuses_a_horizon_that_is_no_positive_number(horizon):
    with pytest.raises(ValueError, match="horizon must be a positive finite number"):
        to_ode_form(ode_resnet(depths=(2,), widths=(4,)), horizon=horizon)


@pytest.mark.parametrize("steps", [10**6, 2**63, 0, -3, True, {"layer1": 10**6}, 0.5])
def test_resample_depth_refuses_counts_outside_the_one_limit_before_allocating(steps):
    with pytest.raises(ValueError, match=r"steps|fraction"):
        resample_depth(resnet18(), steps)


@pytest.mark.parametrize("steps", [(10**9,), (2**63,), (0,), (1.5,), (float("nan"),), ()])
def test_depth_sampling_refuses_step_counts_outside_the_limit_at_construction(steps):
    with pytest.raises(ValueError, match=r"ints in \[1, 100,000\]"):
        DepthSampling(steps=steps)


class _NoForward(NestedBackboneModule):
    forward = NestedBackboneModule.__mro__[1].forward  # LightningModule's own: none


def test_the_probe_needs_a_forward_and_says_so_before_training():
    module = _NoForward(ode_resnet(depths=(2,), widths=(4,), seed=0))
    trainer = quiet_trainer(max_steps=1, callbacks=[SmoothnessMonitor(probe_every_n_epochs=1)])
    with pytest.raises(ValueError, match="defines no forward: define forward"):
        trainer.fit(module, loader(count=4, size=8), loader(count=4, size=8))
    assert trainer.global_step == 0


def test_a_run_too_short_for_the_interval_warns_once_with_the_setting():
    module = NestedBackboneModule(ode_resnet(depths=(2,), widths=(4,), seed=0))
    monitor = SmoothnessMonitor(on_epoch_end=False, plot=False)
    trainer = quiet_trainer(max_steps=16, log_every_n_steps=50, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"nothing was measured in 16 steps.*every 50 steps"):
        trainer.fit(module, loader(count=64, size=8))
    with torch.no_grad():
        assert module(torch.randn(1, 3, 8, 8)).isfinite().all()
