"""The resode command: every subcommand's help, every config on faked data, the error paths."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import one_line_error
from helpers.fake_data import write_cifar10, write_image_folder

from resode_lightning.cli import SUBCOMMANDS, convert, main
from resode_lightning.cli._common import infer_arch
from resode_lightning.cli.train import COMMANDS
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.core.odeform import to_ode_form

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TINY = '--model.backbone_kwargs={"depths": [2], "widths": [4], "init": "tied", "seed": 0}'
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false"]
# error-path runs: fast_dev_run, so that a wrongly accepted config cannot train for long
FAST = ["fit", "--trainer.fast_dev_run=true", *CPU, "--config"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["resode"])  # what the resode script sees besides its args


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("    ")}
    assert listed >= {*COMMANDS, *SUBCOMMANDS}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_training_subcommand_help(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--config", "--model.backbone", "--model.lr", "--data", "--trainer.max_epochs"):
        assert option in text


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_other_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: resode {command}" in capsys.readouterr().out


def _run(args, capsys):
    status = main(args)
    return status, capsys.readouterr()


@pytest.mark.parametrize("config", ["digits_ode_resnet.yaml", "digits_iid.yaml"])
def test_digits_configs_fast_dev_run(config, in_tmp, capsys):
    args = ["fit", "--config", str(CONFIGS / config), *CPU, "--trainer.fast_dev_run=true", TINY]
    status, output = _run(args, capsys)
    assert status == 0, output.err
    assert (in_tmp / "runs" / config.removesuffix(".yaml") / "neural_ode.pt").is_file()


def test_cifar10_config_fast_dev_run(in_tmp, capsys):
    write_cifar10(in_tmp / "data", per_batch=4)
    args = [
        "fit", "--config", str(CONFIGS / "cifar10_resnet18_ode.yaml"), *CPU,
        "--trainer.fast_dev_run=true", "--data.init_args.val_size=4",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
    ]  # fmt: skip
    status, output = _run(args, capsys)
    assert status == 0, output.err


def test_imagenet_config_fast_dev_run_with_a_local_checkpoint(in_tmp, capsys):
    (in_tmp / "checkpoints").mkdir()
    weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in torchvision_resnet("resnet50").state_dict().items()}  # fmt: skip
    torch.save(weights, in_tmp / "checkpoints" / "resnet50.pth")
    write_image_folder(in_tmp / "data" / "imagenet" / "train", classes=("a", "b"), per_class=2)
    write_image_folder(in_tmp / "data" / "imagenet" / "val", classes=("a", "b"), per_class=1)
    args = [
        "fit", "--config", str(CONFIGS / "imagenet_resnet50_finetune.yaml"), *CPU,
        "--trainer.strategy=auto", "--trainer.precision=32-true", "--trainer.sync_batchnorm=false",
        "--trainer.fast_dev_run=true", "--data.init_args.image_size=32",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
    ]  # fmt: skip
    status, output = _run(args, capsys)
    assert status == 0, output.err


def test_fit_then_validate_test_predict_from_the_checkpoint(in_tmp, capsys):
    config = str(CONFIGS / "digits_ode_resnet.yaml")
    fit = ["fit", "--config", config, *CPU, TINY, "--trainer.max_steps=2",
           "--trainer.limit_val_batches=1"]  # fmt: skip
    with pytest.warns(UserWarning, match="nothing was measured in 2 steps"):  # interval 5
        status, output = _run(fit, capsys)
    assert status == 0, output.err
    (checkpoint,) = (in_tmp / "runs" / "digits_ode_resnet").glob("version_0/checkpoints/last.ckpt")
    for command in ("validate", "test", "predict"):
        args = [command, "--config", config, *CPU, TINY, f"--ckpt_path={checkpoint}"]
        status, output = _run(args, capsys)
        assert status == 0, output.err
    assert "test/acc" in _run(["test", "--config", config, *CPU, TINY,
                               f"--ckpt_path={checkpoint}"], capsys)[1].out  # fmt: skip


def test_missing_data_dir_is_reported_with_where_and_how(in_tmp, capsys):
    args = [*FAST, str(CONFIGS / "cifar10_resnet18_ode.yaml"), "--data.init_args.data_dir=nowhere"]
    status, output = _run(args, capsys)
    assert status == 2
    assert "resode fit: error: no CIFAR-10 python batches" in output.err
    assert "nowhere/cifar-10-batches-py" in output.err and "cifar-10-python.tar.gz" in output.err
    assert not (in_tmp / "runs").exists()


def test_bad_config_key_is_named(in_tmp, capsys):
    text = (CONFIGS / "digits_ode_resnet.yaml").read_text()
    assert "\n  lr: " in text
    (in_tmp / "bad.yaml").write_text(text.replace("\n  lr: ", "\n  lrr: "))
    status, output = _run([*FAST, "bad.yaml"], capsys)
    assert status == 2
    assert "does not accept option 'model.lrr'" in output.err
    assert not (in_tmp / "runs").exists()


def test_bad_config_value_is_named(in_tmp, capsys):
    status, output = _run([*FAST, str(CONFIGS / "digits_iid.yaml"), "--model.lr=fast"], capsys)
    assert status == 2
    assert "model.lr" in output.err


def test_unknown_architecture(in_tmp, capsys):
    args = [*FAST, str(CONFIGS / "digits_iid.yaml"), "--model.backbone=resnet99"]
    status, output = _run(args, capsys)
    assert status == 2
    assert "resode fit: error: unknown architecture 'resnet99'; choose one of" in output.err
    assert not (in_tmp / "runs").exists()


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A resnet18 state dict with 10 classes, its file and an ODE-form copy's file."""
    directory = tmp_path_factory.mktemp("r18")
    state = torchvision_resnet("resnet18", num_classes=10).state_dict()
    torch.save(state, directory / "r18.pth")
    torch.save(to_ode_form(torchvision_resnet("resnet18", num_classes=10)).state_dict(),
               directory / "r18_ode.pth")  # fmt: skip
    return state, directory / "r18.pth", directory / "r18_ode.pth"


def _convert(weights, out, *extra):
    return ["convert", "--arch", "resnet18", "--weights", str(weights), "--out", str(out), *extra]


@pytest.mark.parametrize("horizon", ["1e308", "1e-300", "nan", "inf", "0"])
def test_convert_refuses_unrepresentable_horizons_up_front(horizon, tmp_path, capsys):
    args = _convert(tmp_path / "never-read.pth", tmp_path / "out.pt", "--horizon", horizon)
    status, output = _run(args, capsys)
    assert status == 2
    one_line_error(output, "convert", "horizon")
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_non_finite_weights_and_markers(r18, tmp_path, capsys):
    state, _, ode_file = r18
    poisoned = dict(state, **{"layer1.0.conv1.weight": state["layer1.0.conv1.weight"].clone()})
    poisoned["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(poisoned, tmp_path / "nan.pth")
    status, output = _run(_convert(tmp_path / "nan.pth", tmp_path / "out.pt"), capsys)
    assert status == 2
    one_line_error(output, "convert", tmp_path / "nan.pth", "'layer1.0.conv1.weight'", "NaN")
    ode = torch.load(ode_file, weights_only=True)
    for value in ("nan", "inf", "1e308", "-1", "0"):
        ode["layer1.ode_horizon"] = torch.tensor(float(value), dtype=torch.float64)
        torch.save(ode, tmp_path / "marker.pth")
        status, output = _run(_convert(tmp_path / "marker.pth", tmp_path / "out.pt"), capsys)
        assert status == 2, value
        one_line_error(output, "convert", tmp_path / "marker.pth", "'layer1.ode_horizon'")
    assert not (tmp_path / "out.pt").exists()


def test_convert_writes_nothing_when_its_own_check_fails(r18, tmp_path, capsys):
    _, weights, _ = r18
    (tmp_path / "out.pt").write_bytes(b"keep me")
    args = _convert(weights, tmp_path / "out.pt", "--horizon", "3", "--tolerance", "0")
    status, output = _run(args, capsys)
    assert status == 2
    one_line_error(output, "convert", "above --tolerance 0", "nothing was written")
    assert (tmp_path / "out.pt").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_convert_output_paths_are_checked_before_any_work(r18, tmp_path, capsys, monkeypatch):
    _, weights, _ = r18

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output path was checked")

    monkeypatch.setattr(convert, "load_model", never)
    os.mkfifo(tmp_path / "fifo")
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        device = None
    (tmp_path / "dir").mkdir()
    cases = {tmp_path / "fifo": "FIFO", tmp_path / "dir": "is a directory",
             tmp_path / "no" / "out.pt": "does not exist"}  # fmt: skip
    if device is not None:
        cases[device] = "character device"
    for out, expected in cases.items():
        status, output = _run(_convert(weights, out), capsys)
        assert status == 2
        one_line_error(output, "convert", expected)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert device is None or stat.S_ISCHR(os.lstat(device).st_mode)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    status, output = _run(_convert(weights, tmp_path / "out.pt"), capsys)
    assert status == 2
    one_line_error(output, "convert", "is not writable")


def test_convert_writes_through_a_symlink(r18, tmp_path, capsys):
    _, weights, _ = r18
    (tmp_path / "real.pt").write_bytes(b"old")
    (tmp_path / "link.pt").symlink_to("real.pt")
    status, output = _run(_convert(weights, tmp_path / "link.pt"), capsys)
    assert status == 0, output.err
    assert (tmp_path / "link.pt").is_symlink()
    assert "layer1.ode_horizon" in torch.load(tmp_path / "real.pt", weights_only=True)


def _hostile_files(directory: Path) -> dict[str, Path]:
    """Files that are not usable checkpoints, each of a different kind."""
    contents = {
        "text.pth": b"hello, this is a text file\n",
        "gif.pth": b"GIF89a",
        "random.pth": bytes(range(256)) * 8,
    }
    for name, content in contents.items():
        (directory / name).write_bytes(content)
    full = directory / "full.pth"
    torch.save({"fc.weight": torch.zeros(3, 4)}, full)
    (directory / "cut.pth").write_bytes(full.read_bytes()[:300])
    torch.save({"fc.weight": torch.zeros(512).expand(500_000, 512)}, directory / "expanded.pth")
    torch.save({7: torch.zeros(2)}, directory / "int-keys.pth")
    torch.save({"fc.weight": torch.zeros(20, 512)}, directory / "classes.pth")
    torch.save({"fc.weight": _Payload(directory / "executed")}, directory / "payload.pth")
    return {p.stem: p for p in directory.iterdir() if p.name != "full.pth"}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("command", ["convert", "smoothness", "export"])
def test_bad_checkpoints_end_in_one_line_and_status_2(command, tmp_path, capsys):
    for kind, path in _hostile_files(tmp_path).items():
        args = {
            "convert": _convert(path, tmp_path / "out.pt", "--max-classes", "10"),
            "smoothness": ["smoothness", str(path), "--max-classes", "10"],
            "export": ["export", "--arch", "resnet18", "--weights", str(path),
                       "--out", str(tmp_path / "out.pt"), "--max-classes", "10"],
        }[command]  # fmt: skip
        status, output = _run(args, capsys)
        assert status == 2, (kind, output)
        one_line_error(output, command, path)
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "executed").exists()


def test_convert_refuses_more_classes_than_max_classes(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(20, 512)}, tmp_path / "head.pth")
    status, output = _run(
        _convert(tmp_path / "head.pth", tmp_path / "out.pt", "--max-classes", "10"), capsys
    )
    assert status == 2
    one_line_error(output, "convert", "'fc.weight' declares 20 classes, more than --max-classes 10")


def test_smoothness_on_many_long_keys_finishes_quickly(tmp_path, capsys):
    """Inferring the architecture tries 10 of them: 4,000 keys of 40 parts did not finish in
    170 s when every prefix of every key was matched against every key."""
    keys = [".".join(f"p{part}x{key}" for part in range(40)) for key in range(4000)]
    state = {key: torch.zeros(1) for key in keys}
    with pytest.raises(ValueError, match="cannot infer"):
        infer_arch({"fc.weight": torch.zeros(1)})  # builds the 10 skeletons once
    started = time.perf_counter()
    with pytest.raises(ValueError, match="cannot infer"):
        infer_arch(state)
    assert time.perf_counter() - started < 2
    torch.save(state, tmp_path / "keys.pth")
    status, output = _run(["smoothness", str(tmp_path / "keys.pth")], capsys)
    assert status == 2
    one_line_error(output, "smoothness", "cannot infer the architecture")
