"""ImageClassifier: loss and accuracies against hand computations, backbones, weights, schedule."""

from __future__ import annotations

import importlib
import math

import pytest
import pytorch_lightning as pl
import torch
from helpers.boring import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resode_lightning import (
    DigitsDataModule,
    ImageClassifier,
    NeuralODEExport,
    ODEForm,
    SmoothnessMonitor,
    is_ode_form,
    load_neural_ode,
    ode_resnet,
    to_ode_form,
)
from resode_lightning.core.models import torchvision_resnet


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_test_metrics_match_a_float64_hand_computation(label_smoothing):
    # The backbone is the identity, so the inputs are the logits.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 8, generator=generator)
    labels = torch.randint(0, 8, (40,), generator=generator)
    model = ImageClassifier(nn.Identity(), num_classes=8, label_smoothing=label_smoothing)
    loader = DataLoader(TensorDataset(logits, labels), batch_size=10)
    (result,) = quiet_trainer().test(model, loader, verbose=False)

    x = logits.double()
    log_p = x - x.logsumexp(1, keepdim=True)
    eps = label_smoothing
    per_sample = -(1 - eps) * log_p[torch.arange(40), labels] - eps * log_p.mean(1)
    top1 = sum(int(row.argmax() == y) for row, y in zip(x, labels)) / 40
    top5 = sum(int(y in row.argsort(descending=True)[:5]) for row, y in zip(x, labels)) / 40
    assert result["test/loss"] == pytest.approx(float(per_sample.mean()), abs=1e-5)
    assert result["test/acc"] == pytest.approx(top1, abs=1e-6)
    assert result["test/acc_top5"] == pytest.approx(top5, abs=1e-6)


def test_no_top5_with_five_classes_or_fewer():
    loader = DataLoader(TensorDataset(torch.randn(6, 5), torch.arange(6) % 5), batch_size=3)
    (result,) = quiet_trainer().test(
        ImageClassifier(nn.Identity(), num_classes=5), loader, verbose=False
    )
    assert set(result) == {"test/loss", "test/acc"}


def test_named_backbones_and_hyperparameters():
    model = ImageClassifier(
        "ode_resnet", backbone_kwargs={"depths": [3, 2], "widths": [4, 8]}, num_classes=7
    )
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert [len(stage) for stage in model.backbone.stages] == [3, 2]
    assert model.hparams.backbone == "ode_resnet" and model.hparams.num_classes == 7
    grey = ImageClassifier("resnet18", num_classes=4, in_channels=1)
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert grey.backbone.conv1.in_channels == 1


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown architecture 'resnet99'; choose one of ode_resnet, resnet18"
    ):
        ImageClassifier("resnet99")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "adam"}, "optimizer must be 'sgd' or 'adamw'"),
        ({"lr": 0.0}, "need lr > 0"),
        ({"label_smoothing": 1.0}, "label_smoothing must be in"),
        ({"num_classes": 1}, "num_classes >= 2"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(nn.Identity(), **kwargs)


def test_weights_load_a_plain_or_ode_form_checkpoint(tmp_path):
    source = torchvision_resnet("resnet18", num_classes=10).eval()
    batch = torch.randn(2, 3, 32, 32)
    expected = source(batch)
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in to_ode_form(source).state_dict().items()}},
        tmp_path / "ode.ckpt",
    )
    plain = ImageClassifier("resnet18", weights=str(tmp_path / "plain.pth"), num_classes=10).eval()
    assert torch.allclose(plain(batch), expected, atol=1e-5, rtol=0)
    ode = ImageClassifier("resnet18", weights=str(tmp_path / "ode.ckpt"), num_classes=10).eval()
    assert is_ode_form(ode.backbone)
    assert torch.allclose(ode(batch), expected, atol=1e-5, rtol=0)


def test_weights_with_another_class_count_get_a_fresh_head(tmp_path):
    source = torchvision_resnet("resnet18", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = ImageClassifier("resnet18", weights=str(tmp_path / "r18.pth"), num_classes=3)
    assert model.backbone.fc.weight.shape == (3, 512)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        ImageClassifier("resnet18", weights=str(tmp_path / "nothing.pth"))


def _images(count=12, classes=3, size=16):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(count, 3, size, size, generator=generator)
    return DataLoader(TensorDataset(x, torch.arange(count) % classes), batch_size=4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cosine_schedule_spans_all_optimizer_steps(optimizer):
    model = ImageClassifier(
        "ode_resnet",
        backbone_kwargs={"depths": [2], "widths": [4]},
        num_classes=3,
        optimizer=optimizer,
        lr=0.1,
        weight_decay=0.01,
    )
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    quiet_trainer(max_epochs=2, callbacks=[Record()], limit_val_batches=0).fit(model, _images())
    expected = [0.05 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]  # 3 batches x 2 epochs
    assert seen == pytest.approx(expected, abs=1e-9)
    kind = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    assert isinstance(model.trainer.optimizers[0], kind)
    assert model.trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.01


def test_checkpoint_of_an_ode_form_run_loads_back(tmp_path):
    model = ImageClassifier("resnet18", num_classes=3, lr=0.01)
    trainer = quiet_trainer(
        max_steps=1, limit_val_batches=0, callbacks=[ODEForm()], default_root_dir=tmp_path
    )
    trainer.fit(model, _images(size=32))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "run.ckpt").eval()
    assert not is_ode_form(restored.backbone)  # ODEForm's checkpoints hold the plain weights
    batch = torch.randn(2, 3, 32, 32)
    assert torch.allclose(restored(batch), model.eval()(batch), atol=1e-6, rtol=0)


def test_predict_returns_class_probabilities():
    model = ImageClassifier(ode_resnet(depths=[2], widths=[4], num_classes=3), num_classes=3)
    (probabilities, *_) = quiet_trainer().predict(model, _images())
    assert probabilities.shape == (4, 3)
    assert torch.allclose(probabilities.sum(1), torch.ones(4))


def _lightning_pytorch_installed() -> bool:
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "namespace",
    [
        "pytorch_lightning",
        pytest.param(
            "lightning.pytorch",
            marks=pytest.mark.skipif(
                not _lightning_pytorch_installed(), reason="the unified lightning package"
            ),
        ),
    ],
)
def test_either_namespace_fits_the_classifier_on_digits_with_all_callbacks(tmp_path, namespace):
    lightning = importlib.import_module(namespace)
    classifier = importlib.import_module(
        "resode_lightning.lit.classifier"
        if namespace == "pytorch_lightning"
        else "resode_lightning.lit.lightning_pytorch"
    ).ImageClassifier
    torch.manual_seed(0)
    model = classifier(
        "ode_resnet",
        backbone_kwargs={"depths": [4], "widths": [8]},
        in_channels=1,
        optimizer="adamw",
        lr=1e-2,
    )
    data = DigitsDataModule(image_size=16, batch_size=64)  # 20 training batches per epoch
    monitor = SmoothnessMonitor(every_n_steps=10, plot=False)
    path = tmp_path / "digits_ode.pt"
    trainer = quiet_trainer(
        lightning,
        max_epochs=2,
        limit_val_batches=1,
        logger=lightning.loggers.CSVLogger(tmp_path),
        callbacks=[ODEForm(), monitor, NeuralODEExport(path)],
    )
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)

    assert isinstance(model, lightning.LightningModule) and is_ode_form(model.backbone)
    assert monitor.history["backbone.stages.0"]["step"].tolist() == [10, 20, 30, 40]
    assert trainer.global_step == 40 and math.isfinite(result["test/loss"])
    images = next(iter(data.test_dataloader()))[0]
    with torch.no_grad():
        torch.testing.assert_close(
            load_neural_ode(path)(images), model.eval()(images), rtol=0, atol=1e-5
        )
