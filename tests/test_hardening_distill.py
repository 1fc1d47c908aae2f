"""resode distill and distill_depth under bad input (issue 21): settings out of range, runs that
diverge, hostile resume checkpoints, arguments that cannot build a model. Each ends in one named
error (status 2 on the command line) and leaves every file as it was."""

from __future__ import annotations

import io
import json
import math
import os
import random
import sys
import zipfile

import pytest
import torch
from helpers.boring import loader
from helpers.cli import one_line_error

from resode_lightning import export_neural_ode, ode_resnet
from resode_lightning.cli import distill as distill_command
from resode_lightning.cli import main
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.export.distill import _resume, distill_depth
from resode_lightning.export.options import ExportOptions
from resode_lightning.testing import randomize_norms


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["resode"])


def _run(argv, capsys):
    """``resode argv``: its exit status (usage errors included) and captured output."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr()


def _command(tmp_path, *extra):
    """A fast ``resode distill`` of a tiny ODE-ResNet on the 8x8 digits, with ``extra``."""
    weights = tmp_path / "net.pth"
    if not weights.exists():
        net = ode_resnet(depths=(4,), widths=(4,), in_channels=1, seed=0)
        torch.save(net.state_dict(), weights)
    return [
        "distill",
        "--arch",
        "ode_resnet",
        "--arch-kwargs",
        '{"depths": [4], "widths": [4]}',
        "--weights",
        str(weights),
        "--data",
        "digits",
        "--image-size",
        "8",
        "--epochs",
        "1",
        "--steps",
        "1.0",
        "0.5",
        "--lr",
        "0.001",
        "--out",
        str(tmp_path / "ode.pt"),
        "--no-progress",
        *extra,
    ]


def _no_training(monkeypatch):
    """Make any training attempt of ``resode distill`` fail the test."""

    def trained(*args, **kwargs):
        raise AssertionError("resode distill started training")

    monkeypatch.setattr(distill_command, "distill_depth", trained)


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--lr", "inf"], "lr"),
        (["--lr", "nan"], "lr"),
        (["--lr", "1e6"], "lr"),
        (["--lr", "0"], "lr"),
        (["--step-weights", "inf", "1"], "step_weights"),
        (["--step-weights", "nan", "1"], "step_weights"),
        (["--step-weights", "-1", "1"], "step_weights"),
        (["--step-weights", "0", "0"], "step_weights"),
        (["--step-weights", "1", "1", "1"], "step_weights"),
        (["--warmup", "nan"], "warmup"),
        (["--warmup", "1"], "warmup"),
        (["--temperature", "inf"], "temperature"),
        (["--label-weight", "2"], "label_weight"),
        (["--epochs", "0"], "epochs"),
        (["--steps", "NaN"], "steps"),
        (["--steps", "0"], "steps"),
    ],
)
def test_cli_distill_refuses_settings_out_of_range_before_any_work(
    tmp_path, capsys, monkeypatch, extra, named
):
    _no_training(monkeypatch)
    out = tmp_path / "ode.pt"
    out.write_bytes(b"the previous export")
    status, output = _run(_command(tmp_path, *extra), capsys)
    assert status == 2
    one_line_error(output, "distill", named)
    assert out.read_bytes() == b"the previous export"
    assert not (tmp_path / "ode.pt.distill").exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--arch-kwargs", "[]"], "not an object"),
        (["--arch-kwargs", "{"], "not valid JSON"),
        (["--arch-kwargs", '{"depths": [4], "widths": [4], "bogus": 1}'], "bogus"),
        (["--arch-kwargs", '{"depths": [4], "widths": [4], "num_classes": 3}'], "num_classes"),
        (["--arch-kwargs", '{"norm_layer": "x"}'], "norm_layer"),
        (["--arch", "resnet18", "--arch-kwargs", '{"norm_layer": "x"}'], "--arch resnet18"),
        (["--arch", "resnet18", "--arch-kwargs", '{"num_classes": 3}'], "num_classes"),
        (["--arch", "resnet7"], "resnet7"),
        (["--arch", "timm:nonexistent"], "timm:nonexistent"),
        (["--device", "foo"], "foo"),
    ],
)
def test_cli_distill_refuses_what_cannot_build_a_model_in_one_line(
    tmp_path, capsys, monkeypatch, extra, named
):
    _no_training(monkeypatch)
    status, output = _run(_command(tmp_path, *extra), capsys)
    assert status == 2
    one_line_error(output, "distill", named)
    assert not (tmp_path / "ode.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_distill_refuses_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    status, output = _run(_command(tmp_path, "--device", "cuda"), capsys)
    assert status == 2
    one_line_error(output, "distill", "--device cuda", "not available")


def test_cli_distill_checks_its_output_paths_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    missing = tmp_path / "missing" / "ode.pt"
    cases = {
        "a missing directory": (["--out", str(missing)], "does not exist"),
        "a directory": (["--out", str(tmp_path)], "is a directory"),
        "a progress file in a missing directory": (
            ["--checkpoint", str(missing)],
            "does not exist",
        ),
        "the progress file as output": (
            ["--checkpoint", str(tmp_path / "ode.pt")],
            "--checkpoint",
        ),
    }
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):  # root may write anywhere
        cases["a read-only folder"] = (["--out", str(locked / "ode.pt")], "not writable")
    try:
        for case, (extra, named) in cases.items():
            status, output = _run(_command(tmp_path, *extra), capsys)
            assert status == 2, case
            one_line_error(output, "distill", named)
    finally:
        locked.chmod(0o755)


def test_cli_distill_refuses_a_damaged_resume_checkpoint_and_keeps_both_files(tmp_path, capsys):
    argv = _command(tmp_path)
    assert _run(argv, capsys)[0] == 0
    out, checkpoint = tmp_path / "ode.pt", tmp_path / "ode.pt.distill"
    export = out.read_bytes()
    state = torch.load(checkpoint, weights_only=True)
    key = next(iter(state["model"]))
    damaged = {
        "a NaN weight": (
            {
                **state,
                "model": {**state["model"], key: torch.full_like(state["model"][key], math.nan)},
            },
            "NaN",
        ),
        "epoch -2": ({**state, "epoch": -2}, "[0, 1]"),
        "settings 123": ({**state, "settings": 123}, "settings"),
        "model 'abc'": ({**state, "model": "abc"}, "'model'"),
        "no epoch": ({k: v for k, v in state.items() if k != "epoch"}, "'epoch'"),
    }
    for case, (content, named) in damaged.items():
        torch.save(content, checkpoint)
        saved = checkpoint.read_bytes()
        status, output = _run(argv, capsys)
        assert status == 2, case
        one_line_error(output, "distill", checkpoint, named)
        assert out.read_bytes() == export and checkpoint.read_bytes() == saved, case
    torch.save(state, checkpoint)
    status, output = _run([*argv, "--lr", "0.002"], capsys)
    assert status == 2
    one_line_error(output, "distill", checkpoint, "other settings", "lr 0.001 recorded, 0.002 now")


# ----------------------------------------------------------------------------- distill_depth


def _source():
    return randomize_norms(ode_resnet(depths=(4,), widths=(4,), init="iid", seed=0)).eval()


class _PoisonedAt:
    """``data`` whose ``batch``-th batch of its ``epoch``-th pass has inf images."""

    def __init__(self, data, epoch, batch):
        self.data, self.epoch, self.batch, self.passes = data, epoch, batch, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        self.passes += 1
        for number, (images, labels) in enumerate(self.data, 1):
            if (self.passes, number) == (self.epoch, self.batch):
                images = torch.full_like(images, math.inf)
            yield images, labels


def test_distill_depth_stops_at_a_non_finite_loss_naming_it_and_keeps_the_checkpoint(tmp_path):
    data = loader(count=16, size=16, batch_size=4)
    path = tmp_path / "distill.ckpt"
    with pytest.raises(ValueError, match=r"diverged at epoch 2/2, batch 3/4: the loss is nan"):
        distill_depth(_source(), _PoisonedAt(data, 2, 3), epochs=2, checkpoint=path, progress=False)
    written = path.read_bytes()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    with pytest.raises(ValueError, match=f"epoch 2/2, batch 1/4.*{path}"):
        distill_depth(_source(), _PoisonedAt(data, 1, 1), epochs=2, checkpoint=path, progress=False)
    assert path.read_bytes() == written


def test_distill_depth_refuses_non_finite_settings_and_sources(tmp_path):
    source, data = _source(), loader(count=8, size=16, batch_size=4)
    bad_settings = (
        {"lr": math.inf},
        {"lr": 1e6},
        {"lr": "0.1"},
        {"weight_decay": math.inf},
        {"temperature": math.nan},
        {"step_weights": (math.inf, 1, 1)},
        {"steps": (1.0, math.nan)},
        {"warmup": -0.1},
    )
    for bad in bad_settings:
        with pytest.raises(ValueError, match=next(iter(bad))):
            distill_depth(source, data, progress=False, **bad)
    with torch.no_grad():
        source.fc.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="'fc.weight' holds NaN"):
        distill_depth(source, data, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill_depth(_source(), data, checkpoint=tmp_path / "missing" / "c.ckpt", progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real one-epoch distillation checkpoint of :func:`_source`, and its content."""
    path = tmp_path_factory.mktemp("distill") / "distill.ckpt"
    distill_depth(
        _source(), loader(count=8, size=16, batch_size=4), epochs=1, checkpoint=path, progress=False
    )
    return path, torch.load(path, weights_only=True)


def _refused(path, content, named):
    """Write ``content`` at ``path``; resuming from it raises CheckpointError naming ``path``
    and ``named``, and leaves the file as it was."""
    torch.save(content, path)
    saved = path.read_bytes()
    with pytest.raises(CheckpointError) as error:
        distill_depth(
            _source(),
            loader(count=8, size=16, batch_size=4),
            epochs=1,
            checkpoint=path,
            progress=False,
        )
    assert str(path) in str(error.value) and named in str(error.value), str(error.value)
    assert path.read_bytes() == saved


def test_distill_depth_validates_every_field_of_its_resume_checkpoint(tmp_path, checkpoint):
    _, state = checkpoint
    path = tmp_path / "hostile.ckpt"
    model, moments = state["model"], state["optimizer"]["state"]
    key = next(iter(model))
    horizon = next(k for k in model if k.endswith(".horizon"))
    times = next(k for k in model if k.endswith(".field.path.times"))
    first = moments[0]
    cases = {
        "no settings": ({k: v for k, v in state.items() if k != "settings"}, "'settings'"),
        "settings 123": ({**state, "settings": 123}, "settings"),
        "settings list": ({**state, "settings": "[]"}, "settings"),
        "model abc": ({**state, "model": "abc"}, "'model' holds str"),
        "a missing key": ({**state, "model": {k: v for k, v in model.items() if k != key}}, key),
        "epoch -2": ({**state, "epoch": -2}, "[0, 1]"),
        "epoch 2": ({**state, "epoch": 2}, "[0, 1]"),
        "epoch 1.0": ({**state, "epoch": 1.0}, "[0, 1]"),
        "NaN weight": (
            {**state, "model": {**model, key: torch.full_like(model[key], math.nan)}},
            "NaN",
        ),
        "wrong shape": ({**state, "model": {**model, key: torch.zeros(3)}}, "shape"),
        "horizon -1": ({**state, "model": {**model, horizon: -model[horizon]}}, "horizon -1"),
        "times reversed": (
            {**state, "model": {**model, times: model[times].flip(0)}},
            "increasing times",
        ),
        "NaN moment": (
            {
                **state,
                "optimizer": {"state": {0: {**first, "exp_avg": first["exp_avg"] * math.nan}}},
            },
            "NaN",
        ),
        "negative moment": (
            {
                **state,
                "optimizer": {"state": {0: {**first, "exp_avg_sq": -first["exp_avg_sq"] - 1}}},
            },
            "negative",
        ),
        "step 0": (
            {**state, "optimizer": {"state": {0: {**first, "step": torch.tensor(0.0)}}}},
            "step",
        ),
        "no optimizer state": ({**state, "optimizer": {}}, "optimizer"),
        "other settings": (
            {**state, "settings": json.dumps({**json.loads(state["settings"]), "lr": 0.5})},
            "lr 0.5 recorded, 0.0001 now",
        ),
    }
    for case, (content, named) in cases.items():
        try:
            _refused(path, content, named)
        except AssertionError as failure:
            raise AssertionError(case) from failure


def test_distill_depth_resumes_despite_a_forged_schedule_it_rebuilds(tmp_path, checkpoint):
    _, state = checkpoint
    path = tmp_path / "forged.ckpt"
    scheduler = {**state["scheduler"], "lr_lambdas": [{"total": 0, "warmup": 0}]}
    torch.save({**state, "epoch": 0, "scheduler": scheduler}, path)
    data = loader(count=8, size=16, batch_size=4)
    distill_depth(_source(), data, epochs=1, checkpoint=path, progress=False)
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_distill_depth_refuses_a_compressed_record_without_expanding_it(tmp_path, checkpoint):
    original, _ = checkpoint
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record), zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="compressed record"):
        distill_depth(
            _source(),
            loader(count=8, size=16, batch_size=4),
            epochs=1,
            checkpoint=path,
            progress=False,
        )


# ----------------------------------------------------------------------------- fuzz

HOSTILE = (None, -1, 0, 1e308, math.nan, "x", [], {}, 2**70, True, torch.zeros(2))


def _hostile_tensor(like, rng):
    """A tensor that does not fit where ``like`` goes: another shape or dtype, or NaN/inf."""
    choices = (
        torch.zeros(like.numel() + 1),
        like.double(),
        like.to(torch.int64),
        torch.full(like.shape, math.nan),
        torch.full(like.shape, -math.inf),
        like.reshape(-1)[:0],
        torch.tensor(1.0),
    )
    return rng.choice(choices)


def _mutations(state, rng):
    """Hostile variants of a distillation checkpoint's content, each with a name."""
    model, optimizer = state["model"], state["optimizer"]
    moments = optimizer["state"]
    grids = [k for k in model if k.endswith((".horizon", ".times"))]
    keys = [*grids, *rng.sample(sorted(set(model) - set(grids)), 6)]
    for field in state:
        yield f"drop {field}", {k: v for k, v in state.items() if k != field}
        for value in HOSTILE:
            yield f"{field} = {value!r}", {**state, field: value}
    for text in ("x", "[]", "{}", "NaN", '{"lr": NaN}', "1" * 5000, "[" * 100_000):
        yield f"settings {text[:10]!r}", {**state, "settings": text}
    for value in (-2, 2, 2**64, 1.0, "1", torch.tensor(1)):
        yield f"epoch {value!r}", {**state, "epoch": value}
    for key in keys:
        yield f"model drop {key}", {**state, "model": {k: v for k, v in model.items() if k != key}}
        for value in (*HOSTILE, _hostile_tensor(model[key], rng), _hostile_tensor(model[key], rng)):
            yield f"model[{key}] hostile", {**state, "model": {**model, key: value}}
    for key in grids:  # finite values no export has: a horizon <= 0, unordered knot times
        for value in (-model[key], model[key] * 0, model[key].flip(0) * 1e308):
            yield f"model[{key}] out of range", {**state, "model": {**model, key: value}}
    yield "model extra key", {**state, "model": {**model, 5: torch.zeros(1)}}
    for index in rng.sample(sorted(moments), 3):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            entry = moments[index]
            for value in (*HOSTILE[:6], _hostile_tensor(entry[name], rng)):
                changed = {**moments, index: {**entry, name: value}}
                yield (
                    f"optimizer {index} {name}",
                    {**state, "optimizer": {**optimizer, "state": changed}},
                )
        yield (
            f"optimizer {index} = []",
            {
                **state,
                "optimizer": {**optimizer, "state": {**moments, index: []}},
            },
        )
    for index in (-1, 10**6, "0", 1.5):
        changed = {**moments, index: moments[0]}
        yield f"optimizer index {index!r}", {**state, "optimizer": {**optimizer, "state": changed}}
    for value in HOSTILE:
        yield (
            f"param_groups {value!r}",
            {**state, "optimizer": {**optimizer, "param_groups": value}},
        )
        yield f"scheduler {value!r}", {**state, "scheduler": value}


def _damaged_bytes(data, rng, count):
    """``count`` copies of the file's bytes with a few bytes flipped, or cut short."""
    for number in range(count):
        if number % 3 == 0:
            yield f"truncated {number}", data[: rng.randrange(len(data))]
            continue
        changed = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            changed[rng.randrange(len(changed))] ^= 1 << rng.randrange(8)
        yield f"flipped {number}", bytes(changed)


def test_fuzzed_resume_checkpoints_load_or_fail_with_one_named_error(tmp_path, checkpoint):
    original, state = checkpoint
    rng = random.Random(21)
    settings = json.loads(state["settings"])
    student = export_neural_ode(_source(), ExportOptions(gradient="backprop"))
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings["lr"])
    path = tmp_path / "fuzz.ckpt"
    files = []
    for name, content in _mutations(state, rng):
        buffer = io.BytesIO()
        torch.save(content, buffer)
        files.append((name, buffer.getvalue()))
    files.extend(_damaged_bytes(original.read_bytes(), rng, 120))
    assert len(files) >= 300
    outcomes = {"loaded": 0, "refused": 0}
    for name, data in files:
        path.write_bytes(data)
        try:
            epoch = _resume(path, settings, student, optimizer, epochs=1)
        except ValueError as error:  # CheckpointError included
            assert str(path) in str(error) and "\n" not in str(error).strip(), (name, str(error))
            outcomes["refused"] += 1
        else:
            assert epoch in (0, 1), name
            outcomes["loaded"] += 1
    assert outcomes["refused"] > 250 and outcomes["loaded"] > 0, outcomes
    restored = export_neural_ode(_source(), ExportOptions(gradient="backprop"))
    path.write_bytes(original.read_bytes())
    assert _resume(path, settings, restored, optimizer, epochs=1) == 1
    torch.testing.assert_close(dict(restored.state_dict()), dict(state["model"]), rtol=0, atol=0)


def test_cli_distill_refuses_source_weights_holding_nan_and_keeps_the_output(tmp_path, capsys):
    argv = _command(tmp_path)
    weights, out = tmp_path / "net.pth", tmp_path / "ode.pt"
    state = torch.load(weights, weights_only=True)
    state["fc.weight"][0, 0] = math.nan
    torch.save(state, weights)
    out.write_bytes(b"the previous export")
    status, output = _run(argv, capsys)
    assert status == 2
    one_line_error(output, "distill", "'fc.weight'", "NaN")
    assert out.read_bytes() == b"the previous export"
    assert not (tmp_path / "ode.pt.distill").exists()
