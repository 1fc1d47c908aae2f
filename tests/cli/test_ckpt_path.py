"""``--ckpt_path`` hyper-parameters and config files (issue 21): a checkpoint never chooses what
is imported, its sizes go through the package's limits, YAML and JSON bombs are bounded, and
Lightning's own refusals end in one line with status 2."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import one_line_error

from resode_lightning.cli import main
from resode_lightning.cli._checkpoint import (
    check_hyper_parameters,
    read_checkpoint,
    stored_values,
)
from resode_lightning.cli._config import (
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    ConfigError,
    check_config_text,
)
from resode_lightning.core.io.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "configs" / "digits_ode_resnet.yaml")
TINY = '--model.backbone_kwargs={"depths": [2], "widths": [4], "init": "tied", "seed": 0}'
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false"]
QUICK = [*CPU, "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
SENTINEL = textwrap.dedent(
    """
    import pathlib
    pathlib.Path(__file__).with_name("imported").write_text("evilmod was imported")
    class Backbone:
        pass
    """
)
GOODNET = textwrap.dedent(
    """
    from torch import nn
    class TinyNet(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(256, 10))
    """
)
ZEN = "Beautiful is better than ugly"


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["resode"])


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """A working directory holding ``evilmod.py``, importable, whose import writes ``imported``:
    the test fails if anything imports it."""
    (tmp_path / "evilmod.py").write_text(SENTINEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    assert not (tmp_path / "imported").exists()
    assert "evilmod" not in sys.modules


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The content of a checkpoint ``resode fit`` wrote for the digits config with ``TINY``."""
    directory = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        args = ["fit", "--config", DIGITS, *QUICK, TINY, "--trainer.max_steps=5"]
        assert main(args) == 0
    (path,) = directory.glob("runs/digits_ode_resnet/version_0/checkpoints/last.ckpt")
    return torch.load(path, weights_only=True)


def _run(args, capsys):
    status = main(args)
    return status, capsys.readouterr()


def _resume(command: str, path: Path, capsys, *extra: str):
    """``resode COMMAND`` of the digits config with ``TINY`` and ``--ckpt_path=path``."""
    return _run([command, "--config", DIGITS, *QUICK, TINY, f"--ckpt_path={path}", *extra], capsys)


def _save(directory: Path, content: dict, name: str = "hostile.ckpt", **changes) -> Path:
    path = directory / name
    torch.save({**content, **changes}, path)
    return path


def _hparams(content: dict, **changes) -> dict:
    return {**content["hyper_parameters"], **changes}


# ----------------------------------------------------------------------------- class paths


@pytest.mark.parametrize(
    "command, changes, key, named",
    [
        *[(command, {"backbone": {"class_path": "evilmod.Backbone", "init_args": {}}},
           "backbone", "evilmod") for command in ("validate", "test", "fit")],
        ("validate", {"backbone": {"class_path": "this.Foo"}}, "backbone.class_path",
         "'this.Foo'"),
        ("validate", {"backbone_kwargs": {"depths": [2], "x": [{"class_path": "evilmod.B"}]}},
         "backbone_kwargs.x[0].class_path", "evilmod.B"),
        ("test", {"_class_path": "evilmod.Backbone"}, "_class_path", "evilmod.Backbone"),
    ],
)  # fmt: skip
def test_a_checkpoint_never_chooses_what_is_imported(
    command, changes, key, named, trained, sentinel, capsys
):
    """A class path in the hyper-parameters was imported by jsonargparse: ``this.Foo`` printed
    the Zen of Python, ``evilmod.Backbone`` ran evilmod.py of the working directory."""
    path = _save(sentinel, trained, hyper_parameters=_hparams(trained, **changes))
    status, output = _resume(command, path, capsys)
    assert status == 2
    one_line_error(output, command, path, key, named, "never chooses what is imported")
    assert ZEN not in output.out + output.err


def test_a_checkpoint_may_name_the_class_the_config_names(trained, tmp_path, monkeypatch, capsys):
    """The user's own backbone class, named on the command line, may come back from the file."""
    (tmp_path / "goodnet.py").write_text(GOODNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    backbone = {"class_path": "goodnet.TinyNet", "init_args": {}}
    weights = {"backbone.1.weight": torch.zeros(10, 256), "backbone.1.bias": torch.zeros(10)}
    path = _save(tmp_path, trained, state_dict=weights,
                 hyper_parameters=_hparams(trained, backbone=backbone))  # fmt: skip
    named = ["validate", "--config", DIGITS, *QUICK, f"--ckpt_path={path}"]
    status, output = _run([*named, '--model.backbone={"class_path": "goodnet.TinyNet"}'], capsys)
    assert status == 0, output.err
    status, output = _run(named, capsys)  # the config names ode_resnet: the class is refused
    assert status == 2
    one_line_error(output, "validate", "backbone.class_path names 'goodnet.TinyNet'")


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"backbone_kwargs": {"depths": [1024] * 4, "widths": [4096] * 4}},
         "ode_resnet of at least 1,236,950,"),
        ({"backbone_kwargs": {"depths": [2000], "widths": [4]}},
         "depths must be a non-empty list of ints in [1, 1024]"),
        ({"backbone_kwargs": {"depths": [2], "widths": [10**9]}}, "widths must be"),
        ({"num_classes": 10**7}, "num_classes must be an int in [1, 100,000]"),
        ({"backbone": "resnet18", "backbone_kwargs": {"width_per_group": 10**6}},
         "resnet18 of at least"),
        ({"backbone": "resnet18", "backbone_kwargs": {"groups": 1.5}}, "groups 1.5"),
    ],
)  # fmt: skip
def test_checkpoint_sizes_are_refused_before_anything_is_built(
    changes, message, trained, tmp_path, monkeypatch, capsys
):
    """depths [1024]*4 and widths [4096]*4 in a 70 KB checkpoint allocated 4.3 GB."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("resode_lightning.core.models.ODEResNet", _never)
    monkeypatch.setattr("torchvision.models.get_model", _never)
    path = _save(tmp_path, trained, hyper_parameters=_hparams(trained, **changes))
    status, output = _resume("test", path, capsys)
    assert status == 2
    one_line_error(output, "test", path, message)


def _never(*args, **kwargs):
    raise AssertionError("built a backbone the limits should have refused")


def test_the_users_config_goes_through_the_same_limits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    big = '--model.backbone_kwargs={"depths": [4096], "widths": [16]}'
    status, output = _run(["fit", "--config", DIGITS, *CPU, "--trainer.fast_dev_run=true", big],
                          capsys)  # fmt: skip
    assert status == 2
    one_line_error(output, "fit", "depths must be a non-empty list of ints in [1, 1024]")


# ----------------------------------------------------------------------------- bombs


def _laughs(levels: int = 9, fanout: int = 10) -> str:
    """A billion-laughs YAML flow mapping: ``fanout ** levels`` values once expanded."""
    lines = ["{a0: &a0 lol"]
    for level in range(1, levels + 1):
        refs = ", ".join([f"*a{level - 1}"] * fanout)
        lines.append(f", a{level}: &a{level} [{refs}]")
    return "".join(lines) + "}"


def _bomb_config(where: str) -> str:
    text = Path(DIGITS).read_text()
    if where == "backbone_kwargs":
        return text.replace("    init: tied\n", f"    bomb: {_laughs()}\n    init: tied\n")
    return text + f"{where}: {_laughs()}\n"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _bomb_config("backbone_kwargs"), "more than 100,000 values"),
        (lambda: _bomb_config("unknown_key"), "more than 100,000 values"),
        (lambda: "model:\n  lr: " + "[" * 100_000 + "]" * 100_000, "deeper than 64 levels"),
        (lambda: '{"model": {"backbone_kwargs": ' + "[" * 10**5 + "]" * 10**5 + "}}",
         "deeper than 64 levels"),
        (lambda: "model:\n  lr: '" + "[" * 10_000 + "'\n", "deeper than 64 levels"),
    ],
)  # fmt: skip
def test_config_file_bombs_are_refused_in_one_line(make, message, tmp_path, monkeypatch, capsys):
    """Alias expansion under model.backbone_kwargs hung (120 s, 800 MB and growing), under an
    unknown key gave a raw MemoryError; 100,000 levels of nesting a RecursionError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bomb.yaml").write_text(make())
    status, output = _run(["fit", "--config", "bomb.yaml", *CPU, "--trainer.fast_dev_run=true"],
                          capsys)  # fmt: skip
    assert status == 2
    one_line_error(output, "fit", "bomb.yaml", message)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "option",
    [f"--model.backbone_kwargs={_laughs()}", f"--config={_laughs()}", "--model.lr=" + "[" * 10**5],
)
def test_command_line_config_bombs_are_refused_in_one_line(option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, output = _run(["fit", "--config", DIGITS, *CPU, option], capsys)
    assert status == 2
    one_line_error(output, "fit", f"the value of {option.partition('=')[0]}")


def test_a_config_a_config_names_is_bounded_too(tmp_path, monkeypatch, capsys):
    """A config file named as a value inside a config goes through the same check."""
    monkeypatch.chdir(tmp_path)
    data = f"class_path: resode_lightning.DigitsDataModule\nx: {_laughs()}\n"
    (tmp_path / "data.yaml").write_text(data)
    status, output = _run(["fit", "--config", DIGITS, *CPU, "--data=data.yaml"], capsys)
    assert status == 2
    assert "more than 100,000 values" in output.err


def test_anchors_and_aliases_within_the_limits_still_work():
    text = "a: &shared {depths: [2], widths: [4]}\nb: *shared\nc: {<<: *shared, init: tied}\n"
    check_config_text(text, "config")
    for config in (ROOT / "configs").glob("*.yaml"):
        check_config_text(config.read_text(), str(config))


# ----------------------------------------------------------------------------- Lightning's checks


@pytest.mark.parametrize(
    "command, changes, message",
    [
        *[(command, {"pytorch-lightning_version": "0.1.0"}, "claims Lightning 0.1.0, but "
           "Lightning cannot") for command in ("validate", "fit")],
        ("fit", {"epoch": -5}, "'epoch' is -5, not a count in [0, 2,147,483,647]"),
        ("validate", {"global_step": 10**30}, "'global_step' is 1000000000000000000000000000000"),
        ("validate", {"epoch": 2.5}, "'epoch' must be an int, got float"),
    ],
)  # fmt: skip
def test_lightning_side_refusals_are_one_line(command, changes, message, trained, tmp_path, capsys):
    """Version 0.1.0 gave a raw KeyError in Lightning's migration; bad counters were accepted."""
    path = _save(tmp_path, trained, **changes)
    status, output = _resume(command, path, capsys)
    assert status == 2
    one_line_error(output, command, path, message)


def test_loop_counters_are_checked(trained, tmp_path, capsys):
    loops = {**trained["loops"], "fit_loop": {**trained["loops"]["fit_loop"],
             "epoch_progress": {"total": {"ready": -1}}}}  # fmt: skip
    path = _save(tmp_path, trained, loops=loops)
    status, output = _resume("validate", path, capsys)
    assert status == 2
    one_line_error(output, "validate", "'loops.fit_loop.epoch_progress.total.ready' is -1")


def test_fit_refuses_optimizer_states_that_do_not_fit(trained, tmp_path, monkeypatch, capsys):
    """fit raised a raw ValueError from the optimizer's load_state_dict."""
    monkeypatch.chdir(tmp_path)
    (state,) = trained["optimizer_states"]
    groups = [{**group, "params": group["params"][:-1]} for group in state["param_groups"]]
    path = _save(tmp_path, trained, optimizer_states=[{**state, "param_groups": groups}])
    status, output = _resume("fit", path, capsys, "--trainer.max_steps=3")
    assert status == 2
    one_line_error(output, "fit", path, "optimizer state 0 does not fit the model of this config")


def test_fit_resumes_from_its_own_checkpoint(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path, trained)
    status, output = _resume("fit", path, capsys, "--trainer.max_steps=10")
    assert status == 0, output.err


# ----------------------------------------------------------------------------- fuzz

CLASS_PATHS = ["evilmod.Backbone", "evilmod", "this.Foo", "os.system", "builtins.eval",
               "torch.nn.Linear", "resode_lightning.NoSuch", ""]  # fmt: skip


ALLOWED = {"torch.nn.Linear"}  # as if the user's config named it


def _fuzz_value(rng: random.Random, depth: int = 0) -> object:
    choices = [
        lambda: {"class_path": rng.choice(CLASS_PATHS), "init_args": {"x": rng.randint(0, 9)}},
        lambda: rng.choice([10**30, -1, 2.5, float("nan"), True, None, "x" * rng.randint(0, 99)]),
        lambda: [_fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        lambda: {rng.choice(["a", "b", "class_path"]): _fuzz_value(rng, depth + 1)},
        lambda: _nested(rng.randint(1, 300)),
        lambda: torch.zeros(rng.randint(0, 3)),
    ]
    return rng.choice(choices[:2] if depth > 3 else choices)()


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _fanout(levels: int, width: int) -> list:
    value: list = [0]
    for _ in range(levels):
        value = [value] * width  # shared, as a pickle's memo shares it
    return value


def _fuzz_hparams(rng: random.Random, base: dict) -> dict:
    hparams = dict(base)
    mutations = [
        lambda: hparams.update(backbone=_fuzz_value(rng)),
        lambda: hparams.update(backbone={"class_path": rng.choice(CLASS_PATHS)}),
        lambda: hparams.update(backbone=rng.choice(["ode_resnet", "resnet18", "resnet99", 5])),
        lambda: hparams.update(backbone_kwargs={
            "depths": [rng.choice([2, 1024, 2000, 10**9])] * rng.randint(0, 5),
            "widths": [rng.choice([4, 4096, 10**6, -3])] * rng.randint(1, 5)}),
        lambda: hparams.update(backbone_kwargs={"width_per_group": rng.choice([64, 10**6, 1.5])}),
        lambda: hparams.update(backbone_kwargs=_fuzz_value(rng)),
        lambda: hparams.update({rng.choice(["num_classes", "in_channels"]): rng.choice(
            [10, 1, 10**7, -2, 2.5, "10", True])}),
        lambda: hparams.update({rng.choice(["lr", "momentum", "optimizer", "weights"]):
                                _fuzz_value(rng)}),
        lambda: hparams.update({rng.choice(["foo", "_class_path", "_instantiator"]): "evilmod"}),
        lambda: hparams.update(backbone_kwargs={"x": _fanout(rng.randint(3, 5), 10)}),
        lambda: hparams.update(backbone_kwargs={"x": _nested(rng.choice([10, 63, 70, 300]))}),
        lambda: hparams.update(lr=rng.choice([0.1, 1e-3]), momentum=0.5),  # benign ones
        lambda: hparams.update(backbone_kwargs={"depths": [2], "widths": [4], "init": "tied",
                                                "seed": rng.randint(0, 9)}),
    ]  # fmt: skip
    for _ in range(rng.randint(1, 3)):
        rng.choice(mutations)()
    return hparams


def _fuzz_checkpoint(rng: random.Random, base: dict) -> dict:
    changes = {"hyper_parameters": _fuzz_hparams(rng, base["hyper_parameters"])}
    if rng.random() < 0.2:
        changes[rng.choice(["epoch", "global_step"])] = rng.choice([0, 7, -5, 10**30, 2.5])
    if rng.random() < 0.1:
        changes["pytorch-lightning_version"] = rng.choice(["0.1.0", "1.5.0", "2.0.0", "99.0"])
    return {**base, **changes}


def test_fuzzed_checkpoints_end_in_success_or_one_named_error(trained, sentinel, capsys):
    """300 hostile hyper-parameters, counters and versions through the checks --ckpt_path runs
    before anything is parsed or built; 10 of them through the whole command."""
    rng, outcomes = random.Random(21), {"ok": 0, "refused": 0}
    model = {"backbone": "ode_resnet", "backbone_kwargs": {"depths": [2], "widths": [4]}}
    for case in range(300):
        content = _fuzz_checkpoint(rng, trained)
        path = _save(sentinel, content, name=f"fuzz{case}.ckpt")
        try:
            checked = read_checkpoint(path, "validate")
            stored = stored_values(checked["state_dict"])
            hparams = check_hyper_parameters(
                checked["hyper_parameters"], str(path), model=model, allowed=ALLOWED, stored=stored
            )
        except CheckpointError as error:
            assert "\n" not in str(error) and str(path) in str(error), (case, error)
            outcomes["refused"] += 1
        else:
            assert "_class_path" not in hparams and "foo" not in hparams, case
            outcomes["ok"] += 1
        if case % 30 == 0:
            status, output = _resume("validate", path, capsys)
            assert status in (0, 2), (case, output.err)
            if status == 2:
                one_line_error(output, "validate")
            assert ZEN not in output.out + output.err
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 150, outcomes


def _count(value: object, limit: int) -> int:
    """The values of ``value`` with shared parts counted each time, up to ``limit``."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _fuzz_config(rng: random.Random) -> str:
    text = Path(DIGITS).read_text()
    levels, fanout = rng.randint(1, 12), rng.randint(1, 12)
    pieces = [
        lambda: _laughs(levels, fanout),
        lambda: "[" * rng.randint(1, 200) + "]" * rng.randint(0, 200),
        lambda: "{a: " * rng.randint(1, 150) + "1" + "}" * rng.randint(0, 150),
        lambda: "\n" + "".join("  " * i + f"k{i}:\n" for i in range(rng.randint(1, 120))) + "v",
        lambda: json.dumps(_nested(rng.randint(1, 120))),
        lambda: "{class_path: " + rng.choice(["torch.nn.Linear", "resode_lightning.NoSuch",
                                              "pytorch_lightning.callbacks.NoSuch"]) + "}",
        lambda: rng.choice(["1e999", "-5", "'[[[['", "&a x", "*nope", "!!python/name:os.system"]),
        lambda: "'" + _laughs(levels, fanout).replace("'", "''") + "'",
    ]  # fmt: skip
    key = rng.choice(["  bomb", "  lr", "  backbone"])
    value = rng.choice(pieces)()
    where = rng.choice(["model", "top"])
    if where == "model":
        return text.replace("model:\n", f"model:\n{key}: {value}\n", 1)
    return text + f"{key.strip()}: {value}\n"


def test_fuzzed_configs_end_in_success_or_one_named_error(sentinel, capsys):
    """300 hostile YAML configs through the bound check that runs before anything is parsed; 10
    of them through the whole command (jsonargparse's own parse errors keep its usage lines)."""
    rng, refused = random.Random(2121), 0
    for case in range(300):
        text = _fuzz_config(rng)
        try:
            check_config_text(text, f"fuzz{case}.yaml")
        except ConfigError as error:
            assert "\n" not in str(error) and f"fuzz{case}.yaml" in str(error), (case, error)
            refused += 1
        except yaml.YAMLError:
            pass  # no valid YAML: resode refuses the config in one line, see below
        else:
            with contextlib.suppress(yaml.YAMLError):  # an unknown tag: refused by the parser
                loaded = yaml.load(text, Loader=yaml.CSafeLoader)
                assert _count(loaded, 2 * MAX_CONFIG_NODES) <= 2 * MAX_CONFIG_NODES, case
        if case % 30 == 0:
            (sentinel / "fuzz.yaml").write_text(text)
            status, output = _run(["fit", "--config", "fuzz.yaml", *CPU, TINY,
                                   "--trainer.fast_dev_run=true"], capsys)  # fmt: skip
            assert status in (0, 2) and "Traceback" not in output.err, (case, output.err)
            if status == 2 and not output.err.startswith("usage: "):  # jsonargparse's own
                one_line_error(output, "fit")
    assert refused >= 50, refused
    assert MAX_CONFIG_DEPTH == 64


_MEMORY_PROBE = """
import resource, sys
from resode_lightning.cli import main
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak())
for line in sys.stdin.read().splitlines():
    print(main(line.split("\\t")), peak(), flush=True)
"""


def test_hostile_inputs_stay_within_memory(trained, tmp_path):
    """The largest allocations of the issue, each run after the package is imported in a
    process of its own: the peak RSS grows by less than 10x the file size plus 1 GB (the
    imports alone take about 0.9 GB)."""
    size_bomb = _save(tmp_path, trained, hyper_parameters=_hparams(
        trained, backbone_kwargs={"depths": [1024] * 4, "widths": [4096] * 4}))  # fmt: skip
    (tmp_path / "laughs.yaml").write_text(_bomb_config("backbone_kwargs"))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    runs = {
        size_bomb: ["test", "--config", DIGITS, *QUICK, TINY, f"--ckpt_path={size_bomb}"],
        tmp_path / "laughs.yaml": ["fit", "--config", "laughs.yaml", *CPU],
        tmp_path / "deep.json": ["fit", "--config", "deep.json", *CPU],
    }
    stdin = "\n".join("\t".join(args) for args in runs.values())
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], input=stdin, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    imported, *lines = result.stdout.split("\n")[:-1]
    assert len(lines) == len(runs), result.stderr[-2000:]
    for path, line in zip(runs, lines):
        status, peak = map(int, line.split())
        assert status == 2, (path, result.stderr[-2000:])
        assert peak - int(imported) < 10 * path.stat().st_size + 2**30, (path, peak, imported)
