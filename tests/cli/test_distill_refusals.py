"""resode distill and distill_depth under bad input (issue 21): settings out of range, runs that
diverge, hostile resume checkpoints, arguments that cannot build a model. Each ends in one named
error (status 2 on the command line) and leaves every file as it was."""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from helpers.boring import loader
from helpers.cli import distill_command, one_line_error
from pytorch_lightning import Callback

from resode_lightning import load_neural_ode, ode_resnet
from resode_lightning.cli import distill as distill_cli
from resode_lightning.cli import main
from resode_lightning.core.io.checkpoint import safe_torch_load
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.export.distill import checked_resume, distillation_student
from resode_lightning.export.options import ExportOptions
from resode_lightning.lit.distillation import distill_depth
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


def _no_training(monkeypatch):
    """Make any training attempt of ``resode distill`` fail the test."""

    def trained(*args, **kwargs):
        raise AssertionError("resode distill started training")

    monkeypatch.setattr(distill_cli, "distill_depth", trained)


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
    status, output = _run(distill_command(tmp_path, *extra), capsys)
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
    status, output = _run(distill_command(tmp_path, *extra), capsys)
    assert status == 2
    one_line_error(output, "distill", named)
    assert not (tmp_path / "ode.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_distill_refuses_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    status, output = _run(distill_command(tmp_path, "--device", "cuda"), capsys)
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
            status, output = _run(distill_command(tmp_path, *extra), capsys)
            assert status == 2, case
            one_line_error(output, "distill", named)
    finally:
        locked.chmod(0o755)


def _with(state, path, value):
    """A copy of the checkpoint ``state`` whose entry at ``path`` (keys, outermost first) is
    ``value`` (``_DROP``: removed); the containers on the way are copied, the rest shared."""
    if not path:
        return value
    copied = dict(state) if isinstance(state, dict) else list(state)
    key = path[0]
    if len(path) == 1 and value is _DROP:
        del copied[key]
    elif len(path) == 1:
        copied[key] = value
    else:
        copied[key] = _with(state[key], path[1:], value)
    return copied


_DROP = object()


def test_cli_distill_refuses_a_damaged_resume_checkpoint_and_keeps_both_files(tmp_path, capsys):
    argv = distill_command(tmp_path)
    assert _run(argv, capsys)[0] == 0
    out, checkpoint = tmp_path / "ode.pt", tmp_path / "ode.pt.distill"
    export = out.read_bytes()
    state = torch.load(checkpoint, weights_only=True)
    key = next(iter(state["state_dict"]))
    nan = torch.full_like(state["state_dict"][key], math.nan)
    damaged = {
        "a NaN weight": (_with(state, ("state_dict", key), nan), "NaN"),
        "epoch -2": (_with(state, ("epoch",), -2), "[0, 0]"),
        "settings 123": (_with(state, ("distillation", "settings"), 123), "settings"),
        "state_dict 'abc'": (_with(state, ("state_dict",), "abc"), "'state_dict'"),
        "no epoch": (_with(state, ("epoch",), _DROP), "'epoch'"),
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


def test_cli_distill_killed_resumes_at_the_epoch_it_stopped_in(tmp_path, capsys, monkeypatch):
    """A ``resode distill`` killed (SIGKILL) once its first epoch is saved, run again, trains
    the epochs after the last one saved, and only those."""
    argv = [*distill_command(tmp_path), "--epochs", "3"]
    checkpoint = tmp_path / "ode.pt.distill"
    command = [sys.executable, "-m", "resode_lightning", *argv]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    saved = torch.load(checkpoint, weights_only=True)
    done, per_epoch = saved["epoch"] + 1, saved["global_step"] // (saved["epoch"] + 1)
    assert done < 3, "the run ended before it was killed"
    epochs = []

    class Epochs(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            epochs.append(trainer.current_epoch)

    def recorded(*args, **kwargs):
        return distill_depth(*args, **kwargs, trainer={"callbacks": [Epochs()]})

    monkeypatch.setattr(distill_cli, "distill_depth", recorded)
    status, output = _run(argv, capsys)
    assert status == 0 and f"resuming from {checkpoint}" in output.out, output
    assert epochs == [e for e in range(done, 3) for _ in range(per_epoch)]
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3 * per_epoch
    load_neural_ode(tmp_path / "ode.pt")


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


class _Killed:
    """``data`` that raises at its ``stop``-th batch, counted over its passes."""

    def __init__(self, data, stop):
        self.data, self.stop, self.seen = data, stop, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for batch in self.data:
            self.seen += 1
            if self.seen == self.stop:
                raise RuntimeError("killed")
            yield batch


def test_distill_depth_stops_at_a_non_finite_loss_naming_it_and_keeps_the_checkpoint(tmp_path):
    data = loader(count=16, size=16, batch_size=4)
    path = tmp_path / "distill.ckpt"
    with pytest.raises(ValueError, match=r"diverged at epoch 2/2, batch 3/4: the loss is nan"):
        distill_depth(_source(), _PoisonedAt(data, 2, 3), epochs=2, checkpoint=path, progress=False)
    written = path.read_bytes()
    assert torch.load(path, weights_only=True)["epoch"] == 0  # the first epoch's
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
        {"trainer": {"max_epochs": 3}},
    )
    for bad in bad_settings:
        with pytest.raises(ValueError, match=next(iter(bad))):
            distill_depth(source, data, progress=False, **bad)
    with pytest.raises(ValueError, match="a loader with a length"):
        distill_depth(source, (batch for batch in data), progress=False)
    with torch.no_grad():
        source.fc.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="'fc.weight' holds NaN"):
        distill_depth(source, data, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill_depth(_source(), data, checkpoint=tmp_path / "missing" / "c.ckpt", progress=False)


EPOCHS, DATA = 2, {"count": 8, "size": 16, "batch_size": 4}
"""The runs of the checkpoint tests: two epochs of two batches."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint of a distillation of :func:`_source` killed in its second epoch, its
    content, and the export of the same run never killed."""
    path = tmp_path_factory.mktemp("distill") / "distill.ckpt"
    whole = distill_depth(_source(), loader(**DATA), epochs=EPOCHS, progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        distill_depth(
            _source(), _Killed(loader(**DATA), 3), epochs=EPOCHS, checkpoint=path, progress=False
        )
    return path, torch.load(path, weights_only=True), whole.state_dict()


def _resumed(path, content=None):
    """Write ``content`` at ``path`` (unless ``None``) and resume from it."""
    if content is not None:
        torch.save(content, path)
    return distill_depth(
        _source(), loader(**DATA), epochs=EPOCHS, checkpoint=path, progress=False
    ).state_dict()


def _refused(path, content, named):
    """Resuming from ``content`` raises CheckpointError naming the file and ``named``, and
    leaves the file as it was."""
    torch.save(content, path)
    saved = path.read_bytes()
    with pytest.raises(CheckpointError) as error:
        _resumed(path)
    assert str(path) in str(error.value) and named in str(error.value), str(error.value)
    assert path.read_bytes() == saved


def test_distill_depth_validates_every_field_of_its_resume_checkpoint(tmp_path, checkpoint):
    _, state, _ = checkpoint
    path = tmp_path / "hostile.ckpt"
    model, moments = state["state_dict"], state["optimizer_states"][0]["state"]
    key = next(iter(model))
    horizon = next(k for k in model if k.endswith(".horizon"))
    times = next(k for k in model if k.endswith(".field.path.times"))
    first = moments[0]
    settings = json.loads(state["distillation"]["settings"])

    def moment(name, value):
        return _with(state, ("optimizer_states", 0, "state", 0, name), value)

    cases = {
        "no distillation": (_with(state, ("distillation",), _DROP), "not a distillation"),
        "the loop's format": (
            {"format": "resode-depth-distillation/1", "epoch": 1, "model": model},
            "not a distillation",
        ),
        "format /1": (_with(state, ("distillation", "format"), "x/1"), "format 'x/1'"),
        "no settings": (_with(state, ("distillation", "settings"), _DROP), "'settings'"),
        "settings 123": (_with(state, ("distillation", "settings"), 123), "settings"),
        "settings list": (_with(state, ("distillation", "settings"), "[]"), "settings"),
        "state_dict abc": (_with(state, ("state_dict",), "abc"), "'state_dict' holds str"),
        "a missing key": (_with(state, ("state_dict", key), _DROP), key),
        "epoch -2": (_with(state, ("epoch",), -2), "[0, 1]"),
        "epoch 2": (_with(state, ("epoch",), 2), "[0, 1]"),
        "epoch 0.0": (_with(state, ("epoch",), 0.0), "[0, 1]"),
        "global_step 3": (_with(state, ("global_step",), 3), "3 steps at the end of epoch 1"),
        "NaN weight": (_with(state, ("state_dict", key), model[key] * math.nan), "NaN"),
        "wrong shape": (_with(state, ("state_dict", key), torch.zeros(3)), "shape"),
        "horizon -1": (_with(state, ("state_dict", horizon), -model[horizon]), "horizon -1"),
        "times reversed": (
            _with(state, ("state_dict", times), model[times].flip(0)),
            "increasing times",
        ),
        "NaN moment": (moment("exp_avg", first["exp_avg"] * math.nan), "NaN"),
        "negative moment": (moment("exp_avg_sq", -first["exp_avg_sq"] - 1), "negative"),
        "step 0": (moment("step", torch.tensor(0.0)), "step"),
        "no optimizer state": (_with(state, ("optimizer_states", 0), {}), "AdamW state"),
        "two optimizers": (
            _with(state, ("optimizer_states",), state["optimizer_states"] * 2),
            "one AdamW state",
        ),
        "loops 'x'": (_with(state, ("loops",), "x"), "loops"),
        "a loop counter -1": (
            _with(state, ("loops", "fit_loop", "epoch_progress", "total", "ready"), -1),
            "count",
        ),
        "a Lightning that never was": (
            _with(state, ("pytorch-lightning_version",), "x"),
            "claims Lightning 'x'",
        ),
        "other settings": (
            _with(state, ("distillation", "settings"), json.dumps({**settings, "lr": 0.5})),
            "lr 0.5 recorded, 0.0001 now",
        ),
    }
    for case, (content, named) in cases.items():
        try:
            _refused(path, content, named)
        except AssertionError as failure:
            raise AssertionError(case) from failure


def test_distill_depth_resumes_exactly_rebuilding_what_it_does_not_read(tmp_path, checkpoint):
    """A resume ends where the run never killed ends, whatever the file says of the schedule,
    the optimizer's hyper-parameters and the callbacks: those are rebuilt or dropped."""
    _, state, whole = checkpoint
    path = tmp_path / "forged.ckpt"
    forged = _with(state, ("lr_schedulers", 0, "lr_lambdas"), [{"total": 0, "warmup": 0}])
    forged = _with(forged, ("optimizer_states", 0, "param_groups", 0, "lr"), 10.0)
    forged = _with(forged, ("callbacks",), {"ModelCheckpoint": {"best_model_path": str(path)}})
    resumed = _resumed(path, forged)
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["global_step"] == 4


def test_distill_depth_refuses_a_compressed_record_without_expanding_it(tmp_path, checkpoint):
    original, _, _ = checkpoint
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record), zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="compressed record"):
        _resumed(path)


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
    model, moments = state["state_dict"], state["optimizer_states"][0]["state"]
    grids = [k for k in model if k.endswith((".horizon", ".times"))]
    keys = [*grids, *rng.sample(sorted(set(model) - set(grids)), 6)]
    for field in ("state_dict", "epoch", "global_step", "optimizer_states", "distillation"):
        yield f"drop {field}", _with(state, (field,), _DROP)
        for value in HOSTILE:
            yield f"{field} = {value!r}", _with(state, (field,), value)
    for text in ("x", "[]", "{}", "NaN", '{"lr": NaN}', "1" * 5000, "[" * 100_000):
        yield f"settings {text[:10]!r}", _with(state, ("distillation", "settings"), text)
    for value in (-2, 2, 2**64, 1.0, "1", torch.tensor(1)):
        yield f"epoch {value!r}", _with(state, ("epoch",), value)
    for key in keys:
        yield f"model drop {key}", _with(state, ("state_dict", key), _DROP)
        for value in (*HOSTILE, _hostile_tensor(model[key], rng), _hostile_tensor(model[key], rng)):
            yield f"model[{key}] hostile", _with(state, ("state_dict", key), value)
    for key in grids:  # finite values no export has: a horizon <= 0, unordered knot times
        for value in (-model[key], model[key] * 0, model[key].flip(0) * 1e308):
            yield f"model[{key}] out of range", _with(state, ("state_dict", key), value)
    yield "model extra key", _with(state, ("state_dict", 5), torch.zeros(1))
    for index in rng.sample(sorted(moments), 3):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            for value in (*HOSTILE[:6], _hostile_tensor(moments[index][name], rng)):
                where = ("optimizer_states", 0, "state", index, name)
                yield f"optimizer {index} {name}", _with(state, where, value)
        yield f"optimizer {index} = []", _with(state, ("optimizer_states", 0, "state", index), [])
    for index in (-1, 10**6, "0", 1.5):
        where = ("optimizer_states", 0, "state", index)
        yield f"optimizer index {index!r}", _with(state, where, moments[0])
    for value in HOSTILE:
        yield (
            f"param_groups {value!r}",
            _with(state, ("optimizer_states", 0, "param_groups"), value),
        )
        yield f"lr_schedulers {value!r}", _with(state, ("lr_schedulers",), value)


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
    """Every file is read by the safe reader and checked before Lightning sees it."""
    original, state, _ = checkpoint
    rng = random.Random(21)
    settings = json.loads(state["distillation"]["settings"])
    options = ExportOptions(gradient="backprop")
    student = distillation_student(_source(), options, settings["steps"])
    path = tmp_path / "fuzz.ckpt"
    files = []
    for name, content in _mutations(state, rng):
        buffer = io.BytesIO()
        torch.save(content, buffer)
        files.append((name, buffer.getvalue()))
    files.extend(_damaged_bytes(original.read_bytes(), rng, 120))
    assert len(files) >= 300
    outcomes = {"loaded": 0, "refused": 0}

    def resume():
        content = safe_torch_load(path)
        return checked_resume(
            path, content, settings=settings, student=student, epochs=EPOCHS, per_epoch=2
        )

    for name, data in files:
        path.write_bytes(data)
        try:
            checked = resume()
        except ValueError as error:  # CheckpointError included
            assert str(path) in str(error) and "\n" not in str(error).strip(), (name, str(error))
            outcomes["refused"] += 1
        else:
            assert checked["epoch"] in range(EPOCHS) and checked["callbacks"] == {}, name
            outcomes["loaded"] += 1
    assert outcomes["refused"] > 250 and outcomes["loaded"] > 0, outcomes
    path.write_bytes(original.read_bytes())
    checked = resume()
    torch.testing.assert_close(checked["state_dict"], state["state_dict"], rtol=0, atol=0)


def test_cli_distill_refuses_source_weights_holding_nan_and_keeps_the_output(tmp_path, capsys):
    argv = distill_command(tmp_path)
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
