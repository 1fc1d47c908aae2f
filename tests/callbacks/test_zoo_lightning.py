"""A timm ResNet and a registered custom block, each in a user's own LightningModule, through
ODEForm, SmoothnessMonitor and NeuralODEExport, then resumed from their checkpoints."""

import pytest
import pytorch_lightning as pl
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer
from helpers.runif import RunIf
from torch import nn

from resode_lightning import (
    NeuralODEExport,
    ODEForm,
    SmoothnessMonitor,
    find_stages,
    is_ode_form,
    load_neural_ode,
    register_block,
    registration_scope,
)
from resode_lightning.testing import randomize_norms

SIZE = 16


def small_resnet50d() -> nn.Module:
    """resnet50d's layout (deep stem, average-pool downsampling, Bottleneck), made small."""
    from timm.models.resnet import Bottleneck, ResNet

    model = ResNet(
        Bottleneck,
        (3, 2, 1, 1),
        num_classes=10,
        stem_width=4,
        stem_type="deep",
        avg_down=True,
        channels=(4, 8, 8, 8),
        drop_path_rate=0.05,
    )
    return randomize_norms(model)


class GatedBlock(nn.Module):
    """A user's block: x + SiLU-gated conv branch, then a post activation read per block."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act = nn.SiLU()

    def branch(self, x):
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return self.act(x + self.branch(x))


def custom_net() -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return randomize_norms(
        nn.Sequential(stem, nn.Sequential(*[GatedBlock() for _ in range(4)]), head)
    )


@pytest.fixture
def gated_block():
    with registration_scope():
        register_block(
            GatedBlock,
            branch=lambda block, x: block.branch(x),
            last_layer="bn2",
            post="act",
            conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2")),
        )
        yield


def _trainer(root, max_steps, callbacks):
    return quiet_trainer(
        default_root_dir=root,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )


def _run(tmp_path, make_backbone):
    export = tmp_path / "model_ode.pt"
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1
    )
    monitor = SmoothnessMonitor(every_n_steps=1, plot=False)
    module = NestedBackboneModule(make_backbone())
    callbacks = [ODEForm(), monitor, NeuralODEExport(export), checkpoint]
    _trainer(tmp_path / "a", 3, callbacks).fit(module, loader(16, SIZE))
    backbone = module.net["backbone"].eval()
    assert is_ode_form(backbone)
    stages = [f"net.backbone.{stage.name}" for stage in find_stages(backbone)]
    assert set(monitor.history) == set(stages)

    loaded = load_neural_ode(export, model=make_backbone())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = backbone(x)
        assert ((loaded(x) - expected).abs().max() / expected.abs().max()) <= 1e-5

    resumed_monitor = SmoothnessMonitor(every_n_steps=1, plot=False)
    resumed = NestedBackboneModule(make_backbone())
    _trainer(tmp_path / "b", 4, [ODEForm(), resumed_monitor, NeuralODEExport(export)]).fit(
        resumed, loader(16, SIZE), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    )
    for name in stages:
        assert resumed_monitor.history[name]["step"].tolist() == [1, 2, 3, 4]
    assert load_neural_ode(export, model=make_backbone()) is not None


@RunIf(timm=True)
def test_timm_resnet50d_like_trains_monitors_exports_and_resumes(tmp_path):
    _run(tmp_path, small_resnet50d)


def test_registered_custom_block_trains_monitors_exports_and_resumes(tmp_path, gated_block):
    _run(tmp_path, custom_net)
