"""DepthSampling in real Trainer runs: every batch at full depth and the other counts, on
ODE-ResNets, torchvision and timm nets."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from pytorch_lightning import Callback, Trainer
from torchvision.models.resnet import BasicBlock, ResNet

from resode_lightning import (
    DepthSampling,
    ODEForm,
    find_stages,
    ode_resnet,
)
from resode_lightning.core.models import PreActBlock

# ----------------------------------------------------------------------------- run-time steps


class _CountBlocks(Callback):
    """Records, per training batch, how many stage blocks ran with gradient and whether the BN
    running statistics moved."""

    def __init__(self):
        self.calls, self.moved = [], []

    def on_fit_start(self, trainer, pl_module):
        self.blocks = list(pl_module.net["backbone"].stages[0])
        for block in self.blocks:
            block.register_forward_pre_hook(self._count)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append(0)
        self.stats = self.blocks[0].bn1.running_mean.clone()

    def _count(self, module, args):
        self.calls[-1] += torch.is_grad_enabled()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.moved.append(not torch.equal(self.blocks[0].bn1.running_mean, self.stats))


def _fit(callbacks, steps=6):
    module = NestedBackboneModule(ode_resnet(depths=(8,), widths=(4,), init="tied", seed=0))
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, loader(count=4 * steps, size=16))
    return module


def test_depth_sampling_runs_every_batch_at_full_depth_and_the_other_counts():
    counter = _CountBlocks()
    module = _fit([DepthSampling(steps=(1.0, 0.5, 0.25)), counter], steps=3)
    assert counter.calls == [8 + 4 + 2] * 3  # blocks run with gradient per batch
    assert all(counter.moved)  # the full-depth pass updates the running statistics
    stage = find_stages(module)[0]
    assert all(isinstance(b, PreActBlock) and b.step == 1 / 8 for b in stage.blocks)
    chain = [module, module.net["backbone"], stage.container]  # hooked while fitting only
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in chain)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_depth_sampling_trains_ode_form_torchvision_and_timm_nets(kind):
    if kind == "timm":
        timm = pytest.importorskip("timm")
        net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        net = ResNet(BasicBlock, [3, 1, 1, 1], num_classes=10)
    module = NestedBackboneModule(net)
    stage = find_stages(net)[0]
    blocks, calls = stage.blocks, []
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    before = [b.conv1.weight.detach().clone() for b in blocks]
    trainer = quiet_trainer(
        max_steps=2, limit_val_batches=0, callbacks=[ODEForm(), DepthSampling(steps=(1.0, 0.5))]
    )
    trainer.fit(module, loader(count=8, size=32))
    depth = stage.depth
    assert sum(calls) == 2 * (depth + max(1, depth // 2))  # full + half, per batch
    assert find_stages(net)[0].blocks == blocks and find_stages(net)[0].is_ode_form
    assert all(not torch.equal(b.conv1.weight, w) for b, w in zip(blocks, before))


def test_depth_sampling_draws_reproducibly_and_pickles():
    sampling = DepthSampling(steps=(1.0, 0.5, 0.25), draws=1, seed=3)
    counter = _CountBlocks()
    _fit([sampling, counter], steps=12)
    draws = [8 + [4, 2][random.Random(f"3:0:{i}").sample([0, 1], 1)[0]] for i in range(12)]
    assert counter.calls == draws and set(draws) == {8 + 4, 8 + 2}
    pickle.loads(pickle.dumps(sampling))


def test_depth_sampling_validates_its_arguments_and_the_model():
    for bad in ((), (0.0,), (1.5,), (0,), (True,), ("1",)):
        with pytest.raises(ValueError, match="steps"):
            DepthSampling(steps=bad)
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match="draws"):
            DepthSampling(draws=bad)
    with pytest.raises(ValueError, match="exceed the depth"):
        _fit([DepthSampling(steps=(16,))], steps=1)
    plain = NestedBackboneModule(ResNet(BasicBlock, [3, 1, 1, 1]))
    trainer = Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, callbacks=[DepthSampling()]
    )
    with pytest.raises(ValueError, match="not in ODE form"):
        trainer.fit(plain, loader(count=4, size=16))
