"""ODEForm in a real Trainer: conversion at setup, kept through fits, resumes and strategies."""

import copy

import pytest
import pytorch_lightning as pl
import torch
import torchvision.models as tvm
from helpers.boring import NestedBackboneModule, loader, quiet_trainer

from resode_lightning import ODEForm, is_ode_form, load_state_dict_file
from resode_lightning.core.stages import find_stages

FIXED = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


class RecordAtFitStart(pl.Callback):
    """Records the module's eval outputs on a fixed batch when fitting starts (after setup)."""

    def __init__(self):
        self.outputs = []

    def on_fit_start(self, trainer, pl_module):
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.outputs.append(pl_module(FIXED.to(pl_module.device)).cpu())
        pl_module.train(was_training)


def outputs(module):
    module.eval()
    with torch.no_grad():
        return module(FIXED)


def trainer(tmp_path, callbacks, max_steps=3, **kwargs):
    return quiet_trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_checkpointing=True,
        **kwargs,
    )


def test_converts_at_setup_without_changing_outputs_then_trains(tmp_path):
    module = NestedBackboneModule(tvm.resnet18(num_classes=10))
    before = outputs(module)
    record = RecordAtFitStart()
    trainer(tmp_path, [ODEForm(), record]).fit(module, loader())
    assert is_ode_form(module)
    torch.testing.assert_close(record.outputs[0], before, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs(module), before)  # training proceeded
    assert "net.backbone.layer1.ode_horizon" in module.state_dict()


def test_fitting_twice_does_not_rescale_again(tmp_path):
    module = NestedBackboneModule(tvm.resnet18(num_classes=10))
    trainer(tmp_path, [ODEForm()]).fit(module, loader())
    bn_weight = module.net["backbone"].layer1[1].bn2.layer.weight.detach().clone()
    after_first = outputs(module)
    record = RecordAtFitStart()
    trainer(tmp_path, [ODEForm(), record], max_steps=1).fit(module, loader())
    torch.testing.assert_close(record.outputs[0], after_first)
    # SGD moved it a little; a second rescale would have doubled it (L / horizon = 2)
    ratio = module.net["backbone"].layer1[1].bn2.layer.weight.detach() / bn_weight
    assert float((ratio - 1).abs().max()) < 0.2


def test_resume_from_checkpoint_restores_without_a_second_rescale(tmp_path):
    module = NestedBackboneModule(tvm.resnet18(num_classes=10))
    first = trainer(tmp_path, [ODEForm()], max_steps=2)
    first.fit(module, loader())
    first.save_checkpoint(tmp_path / "two_steps.ckpt")
    saved = copy.deepcopy(module)
    # the checkpoint is loadable with weights_only=True: plain weights, the form in the
    # callback's state (so a plain model reloads it strictly)
    state = load_state_dict_file(tmp_path / "two_steps.ckpt")
    assert "net.backbone.layer1.ode_horizon" not in state
    horizons = torch.load(tmp_path / "two_steps.ckpt", weights_only=True)["callbacks"]["ODEForm"]
    assert horizons["horizons"] == {"net.backbone.layer1.ode_horizon": 1.0}

    record = RecordAtFitStart()
    resumed = NestedBackboneModule(tvm.resnet18(num_classes=10))
    trainer(tmp_path, [ODEForm(), record], max_steps=3).fit(
        resumed, loader(), ckpt_path=tmp_path / "two_steps.ckpt"
    )
    torch.testing.assert_close(record.outputs[0], outputs(saved))
    assert find_stages(resumed)[0].horizon == 1.0


def test_horizon_is_validated_at_construction():
    for bad in (0, -1.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match="horizon"):
            ODEForm(horizon=bad)


def test_module_without_stages_fails_at_setup_with_the_registration_hint(tmp_path):
    module = NestedBackboneModule(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    )
    with pytest.raises(ValueError, match="register_block"):
        trainer(tmp_path, [ODEForm()]).fit(module, loader())


def test_works_with_the_lightning_pytorch_namespace(tmp_path):
    lightning_pytorch = pytest.importorskip("lightning.pytorch")

    class Module(lightning_pytorch.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = tvm.resnet18(num_classes=10)

        def forward(self, x):
            return self.backbone(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    before = outputs(module)
    callback = ODEForm()
    assert isinstance(callback, lightning_pytorch.Callback) and isinstance(callback, pl.Callback)
    quiet_trainer(
        lightning_pytorch,
        default_root_dir=tmp_path,
        max_steps=0,
        callbacks=[callback],
        enable_checkpointing=True,
    ).fit(module, loader())
    assert is_ode_form(module)
    torch.testing.assert_close(outputs(module), before, rtol=1e-5, atol=1e-6)


class ConvertToSyncBatchNorm(pl.Callback):
    """What a DDP strategy with ``sync_batchnorm=True`` does between setup and fit start."""

    def setup(self, trainer, pl_module, stage):
        pl_module.net["backbone"] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
            pl_module.net["backbone"]
        )


def test_sync_batchnorm_replacement_keeps_the_function(tmp_path):
    module = NestedBackboneModule(tvm.resnet18(num_classes=10))
    before = outputs(module)
    record = RecordAtFitStart()
    callbacks = [ODEForm(), ConvertToSyncBatchNorm(), record]
    trainer(tmp_path, callbacks, max_steps=0).fit(module, loader())
    # the BatchNorm in the ODEStep holding the step was replaced, the step kept
    assert isinstance(module.net["backbone"].layer1[1].bn2.layer, torch.nn.SyncBatchNorm)
    torch.testing.assert_close(record.outputs[0], before, rtol=1e-5, atol=1e-6)


class FailingModule(NestedBackboneModule):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("boom")


def test_restore_hook_leaves_the_module_when_the_run_fails(tmp_path):
    module = FailingModule(tvm.resnet18(num_classes=10))
    plain = module.state_dict()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [ODEForm()]).fit(module, loader())
    assert is_ode_form(module)
    with pytest.raises(RuntimeError, match="ode_horizon"):
        module.load_state_dict(plain)
