"""The resode command: every subcommand's help, every config on faked data, the error paths."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers.fake_data import write_cifar10, write_image_folder

from resode_lightning.cli import SUBCOMMANDS, main
from resode_lightning.cli.train import COMMANDS
from resode_lightning.core.models import torchvision_resnet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SNIPPETS = sorted((ROOT / "docs" / "snippets").glob("*.py"))
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


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.stem for s in SNIPPETS])
def test_readme_snippets_run(snippet, in_tmp):
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(snippet), run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def test_readme_shows_the_tested_snippets_verbatim():
    text = (ROOT / "README.md").read_text()
    assert len(SNIPPETS) >= 4
    for snippet in SNIPPETS:
        code = snippet.read_text().split('"""', 2)[2].lstrip("\n")
        assert code in text, f"README.md lacks the code of {snippet.name}"
