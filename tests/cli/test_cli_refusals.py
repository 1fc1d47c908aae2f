"""Bad input files and values of resode fit/validate/test/predict --ckpt_path and resode export:
one line on stderr naming what was wrong, status 2, nothing unpickled, nothing written."""

from __future__ import annotations

import os
import pickle
import stat
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.cli import one_line_error
from helpers.fake_data import write_cifar10, write_image_folder

from resode_lightning.cli import export, main
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.lit.classifier import ImageClassifier

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "configs" / "digits_ode_resnet.yaml")
KWARGS = {"depths": [2], "widths": [4], "init": "tied", "seed": 0}
TINY = '--model.backbone_kwargs={"depths": [2], "widths": [4], "init": "tied", "seed": 0}'
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["resode"])


def _run(args, capsys):
    status = main(args)
    return status, capsys.readouterr()


# ----------------------------------------------------------------------------- --ckpt_path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _checkpoint(**changes) -> dict:
    """A Lightning checkpoint of the digits config's model with ``TINY`` (10 classes, 1 channel)."""
    model = ImageClassifier("ode_resnet", backbone_kwargs=KWARGS, num_classes=10, in_channels=1)
    content = {
        "pytorch-lightning_version": pl.__version__,
        "epoch": 0,
        "global_step": 0,
        "state_dict": model.state_dict(),
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    return {**content, **changes}


def _bad_checkpoints(directory: Path) -> dict[str, tuple[Path, str]]:
    """Files --ckpt_path cannot use, each with a part of the message it gets."""
    good = _checkpoint()
    head = {**good["state_dict"], "backbone.fc.weight": torch.zeros(3, 4)}
    files = {
        "payload": _checkpoint(extra=_Payload(directory / "executed")),
        "list": [1, 2],
        "plain": good["state_dict"],
        "hparams": _checkpoint(hyper_parameters=5),
        "version": _checkpoint(**{"pytorch-lightning_version": "not a version"}),
        "loops": _checkpoint(loops={"fit_loop": {}}),
        "keys": _checkpoint(state_dict={"foo": torch.zeros(1)}),
        "head": _checkpoint(state_dict=head),
    }
    for name, content in files.items():
        torch.save(content, directory / f"{name}.ckpt")
    (directory / "text.ckpt").write_text("hello, this is a text file\n")
    (directory / "empty.ckpt").write_bytes(b"")
    (directory / "cut.ckpt").write_bytes((directory / "plain.ckpt").read_bytes()[:300])
    (directory / "dir.ckpt").mkdir()
    torch.save(good["state_dict"], directory / "weights.safetensors")
    expected = {
        "payload": "refused without executing anything (GLOBAL posix.system)",
        "list": "holds list, not a state dict",
        "plain": "holds weights only, not a Lightning checkpoint",
        "hparams": "'hyper_parameters' entry is of type int, not a mapping",
        "version": "has no valid 'pytorch-lightning_version' (found 'not a version')",
        "loops": "has no 'validate_loop' state",
        "keys": "does not fit the model of this config: 28 missing key(s)",
        "head": "does not fit the model of this config",
        "text": "is not a readable PyTorch checkpoint",
        "empty": "is empty",
        "cut": "is not a readable PyTorch checkpoint",
        "dir": "does not exist or is not a file",
        "missing": "does not exist or is not a file",
        "weights": "holds weights only, not a Lightning checkpoint",
    }
    paths = {path.stem: path for path in directory.iterdir()}
    paths["missing"] = directory / "missing.ckpt"
    return {kind: (paths[kind], message) for kind, message in expected.items()}


def test_validate_ckpt_path_bad_files_end_in_one_line_and_status_2(tmp_path, capsys):
    """Payloads gave a raw UnpicklingError advising weights_only=False; text, truncated and
    directory files raw KeyError, RuntimeError or IsADirectoryError; others raw errors later."""
    checkpoints = _bad_checkpoints(tmp_path)
    for kind, (path, message) in checkpoints.items():
        args = ["validate", "--config", DIGITS, *CPU, TINY, f"--ckpt_path={path}"]
        status, output = _run(args, capsys)
        assert status == 2, (kind, output.err)
        one_line_error(output, "validate", path, message)
    assert not (tmp_path / "executed").exists()


@pytest.mark.parametrize("command", ["fit", "test", "predict"])
def test_other_commands_check_the_ckpt_path_file_too(command, tmp_path, capsys):
    checkpoints = _bad_checkpoints(tmp_path)
    for kind in ("payload", "text", "dir", "plain"):
        path, message = checkpoints[kind]
        args = [command, "--config", DIGITS, *CPU, TINY, f"--ckpt_path={path}"]
        status, output = _run(args, capsys)
        assert status == 2, (kind, output.err)
        one_line_error(output, command, path, message)
    assert not (tmp_path / "executed").exists()


def test_fit_needs_a_checkpoint_with_optimizer_state(tmp_path, capsys):
    """A weights-only checkpoint gave a raw KeyError once fit had started."""
    content = {k: v for k, v in _checkpoint().items() if k != "optimizer_states"}
    torch.save(content, tmp_path / "weights-only.ckpt")
    args = ["fit", "--config", DIGITS, *CPU, TINY, f"--ckpt_path={tmp_path / 'weights-only.ckpt'}"]
    status, output = _run(args, capsys)
    assert status == 2
    one_line_error(output, "fit", "holds no optimizer and scheduler state", "--model.weights")


@pytest.mark.parametrize("keyword", ["best", "last"])
def test_evaluation_refuses_best_and_last_which_a_new_process_lacks(keyword, capsys):
    """'best' gave a raw ValueError; 'last' evaluated the untrained model with a warning."""
    args = ["test", "--config", DIGITS, *CPU, TINY, f"--ckpt_path={keyword}"]
    status, output = _run(args, capsys)
    assert status == 2
    one_line_error(output, "test", f"--ckpt_path '{keyword}'", "give the checkpoint file")


@pytest.mark.parametrize(
    "option, message",
    [
        ("--trainer.max_epochs=-5", "`max_epochs` must be a non-negative integer or -1"),
        ("--trainer.max_steps=-3", "max_steps"),
    ],
)
def test_trainer_values_lightning_refuses_end_in_one_line(option, message, tmp_path, capsys):
    """Lightning's MisconfigurationException was a raw traceback."""
    status, output = _run(["fit", "--config", DIGITS, *CPU, TINY, option], capsys)
    assert status == 2
    one_line_error(output, "fit", message)


# ----------------------------------------------------------------------------- data files


def test_fit_on_a_cifar_batch_with_string_labels(tmp_path, capsys, monkeypatch):
    """String labels raised a raw numpy UFuncTypeError."""
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "data", per_batch=4)
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    content = {b"data": torch.zeros(4, 3072, dtype=torch.uint8).numpy(), b"labels": [b"cat"] * 4}
    batch.write_bytes(pickle.dumps(content, protocol=2))
    args = ["fit", "--config", str(ROOT / "configs" / "cifar10_resnet18_ode.yaml"), *CPU,
            "--trainer.fast_dev_run=true", "--data.init_args.val_size=4",
            "--data.init_args.num_workers=0"]  # fmt: skip
    status, output = _run(args, capsys)
    assert status == 2
    one_line_error(output, "fit", "data/cifar-10-batches-py/data_batch_1: 'labels' must be a list")


def _image_folder_config(tmp_path: Path) -> Path:
    config = tmp_path / "folder.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, fast_dev_run: true, logger: false,\n"
        "          enable_checkpointing: false, enable_progress_bar: false}\n"
        "model: {backbone: ode_resnet, backbone_kwargs: {depths: [2], widths: [4]}}\n"
        "data:\n"
        "  class_path: resode_lightning.ImageFolderDataModule\n"
        f"  init_args: {{data_dir: {tmp_path / 'images'}, image_size: 8, batch_size: 8,\n"
        "              num_workers: 0, augment: false}\n"
    )
    return config


def test_fit_on_an_image_folder_with_a_file_that_is_no_image(tmp_path, capsys):
    """It raised a raw UnidentifiedImageError mid-training; now setup names the file."""
    write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    (tmp_path / "images" / "b" / "page.jpg").write_text("<html>not found</html>")
    status, output = _run(["fit", "--config", str(_image_folder_config(tmp_path))], capsys)
    assert status == 2
    one_line_error(output, "fit", tmp_path / "images" / "b" / "page.jpg", "remove or replace")


def test_fit_on_an_image_folder_skips_an_image_that_fails_to_decode(tmp_path, capsys):
    """It raised a raw OSError mid-training; now the image is skipped with a warning."""
    write_image_folder(tmp_path / "images" / "train", classes=("a", "b"), per_class=3)
    write_image_folder(tmp_path / "images" / "val", classes=("a", "b"), per_class=1)
    image = tmp_path / "images" / "train" / "a" / "0.png"  # in the one training batch
    image.write_bytes(image.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipped unreadable image .*0.png"):
        status, output = _run(["fit", "--config", str(_image_folder_config(tmp_path))], capsys)
    assert status == 0, output.err


# ----------------------------------------------------------------------------- resode export


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A resnet18 state dict with 10 classes and its file."""
    state = torchvision_resnet("resnet18", num_classes=10).state_dict()
    path = tmp_path_factory.mktemp("r18") / "r18.pth"
    torch.save(state, path)
    return state, path


def _export(weights, out, *extra):
    return ["export", "--arch", "resnet18", "--weights", str(weights), "--out", str(out), *extra]


def _never(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the arguments were checked")


@pytest.mark.parametrize("size", ["0", "-1", "100000"])
def test_export_refuses_a_size_out_of_range_up_front(size, r18, tmp_path, capsys, monkeypatch):
    """--size 0 gave a raw RuntimeError from a convolution after the export was built."""
    monkeypatch.setattr(export, "load_model", _never)
    status, output = _run(_export(r18[1], tmp_path / "out.pt", "--size", size), capsys)
    assert status == 2
    one_line_error(output, "export", f"--size must be between 1 and 1024 pixels, got {size}")
    assert list(tmp_path.iterdir()) == []


def test_export_checks_the_output_path_before_any_work(r18, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "load_model", _never)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    cases = {tmp_path / "fifo": "FIFO", tmp_path / "dir": "is a directory",
             tmp_path / "no" / "out.pt": "does not exist"}  # fmt: skip
    for out, expected in cases.items():
        status, output = _run(_export(r18[1], out), capsys)
        assert status == 2
        one_line_error(output, "export", expected)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


def test_export_refuses_non_finite_weights_and_large_heads(r18, tmp_path, capsys):
    state, _ = r18
    poisoned = dict(state, **{"layer2.0.conv1.weight": state["layer2.0.conv1.weight"].clone()})
    poisoned["layer2.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    torch.save(poisoned, tmp_path / "inf.pth")
    status, output = _run(_export(tmp_path / "inf.pth", tmp_path / "out.pt"), capsys)
    assert status == 2
    one_line_error(output, "export", tmp_path / "inf.pth", "'layer2.0.conv1.weight'", "NaN or inf")
    status, output = _run(_export(r18[1], tmp_path / "out.pt", "--max-classes", "5"), capsys)
    assert status == 2
    one_line_error(output, "export", "declares 10 classes, more than --max-classes 5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.pth"]


def test_export_writes_nothing_when_its_output_is_not_finite(r18, tmp_path, capsys):
    """Finite weights whose logits overflow float32: the export was written all the same."""
    state, _ = r18
    torch.save(dict(state, **{"fc.weight": torch.full((10, 512), 3e38)}), tmp_path / "huge.pth")
    (tmp_path / "out.pt").write_bytes(b"keep me")
    status, output = _run(_export(tmp_path / "huge.pth", tmp_path / "out.pt"), capsys)
    assert status == 2
    one_line_error(output, "export", "not finite", "nothing was written")
    assert (tmp_path / "out.pt").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.pth", "out.pt"]
