"""Safe checkpoint loading, atomic writes and `resode convert`."""

import fcntl
import io
import os
import pickle
import re
import stat
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision.models as tvm

from resode_lightning import (
    CheckpointError,
    is_ode_form,
    load_into,
    load_state_dict_file,
    to_ode_form,
)
from resode_lightning.cli import main
from resode_lightning.cli._checkpoint import read_checkpoint
from resode_lightning.core.io.atomic import atomic_save, atomic_write
from resode_lightning.core.io.checkpoint import safe_torch_load
from resode_lightning.core.odeform import strip_prefix


class Payload:
    """Pickles into a call that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mknod, (self.marker,))


def files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_torchvision_pth_round_trip(tmp_path):
    model = tvm.resnet18(num_classes=5)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    state = load_state_dict_file(tmp_path / "r18.pth")
    assert set(state) == set(model.state_dict())
    loaded = load_into(tvm.resnet18(num_classes=5), state)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_lightning_style_checkpoint_with_prefix(tmp_path):
    model = tvm.resnet18(num_classes=5)
    checkpoint = {
        "epoch": 3,
        "global_step": 10,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"lr": 0.1, "arch": "resnet18"},
        "optimizer_states": [],
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    state = load_state_dict_file(tmp_path / "last.ckpt")
    assert strip_prefix(state, model).keys() == model.state_dict().keys()
    load_into(tvm.resnet18(num_classes=5), state)


def test_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "evil": Payload(marker)},
        tmp_path / "evil.pth",
    )
    with pytest.raises(CheckpointError, match="refused without executing anything"):
        load_state_dict_file(tmp_path / "evil.pth")
    assert not marker.exists()
    # a bare pickle file (not torch.save) is refused as well
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError):
        load_state_dict_file(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    torch.save(tvm.resnet18().state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or another format"):
        load_state_dict_file(tmp_path / "cut.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_state_dict_file(tmp_path / "notes.txt")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict_file(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict_file(tmp_path / "missing.pth")


def test_other_architecture_lists_missing_and_unexpected_keys():
    with pytest.raises(CheckpointError) as error:
        load_into(tvm.resnet50(), tvm.resnet18().state_dict())
    message = str(error.value)
    assert "missing key(s)" in message and "layer1.0.conv3.weight" in message
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \[layer1.0.bn3"):
        load_into(tvm.resnet18(), tvm.resnet50().state_dict())


def test_atomic_save_keeps_existing_file_on_failure(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous content")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": torch.zeros(1000), "b": Unpicklable()}, target)
    assert target.read_bytes() == b"previous content"
    assert files(tmp_path) == ["model.pt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_save({}, tmp_path / "no" / "such" / "dir.pt")


def test_atomic_save_gives_new_files_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_save({"a": torch.zeros(1)}, tmp_path / "new.pt")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.pt").stat().st_mode & 0o777 == 0o644


def test_convert_cli_writes_an_ode_form_state_dict(tmp_path, capsys):
    model = tvm.resnet50(num_classes=10).eval()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "in.ckpt",
    )
    status = main(
        [
            "convert",
            "--arch",
            "resnet50",
            "--weights",
            str(tmp_path / "in.ckpt"),
            "--out",
            str(tmp_path / "out.pt"),
            "--horizon",
            "2",
        ]
    )
    assert status == 0
    assert "max relative output change" in capsys.readouterr().out
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert float(state["layer3.ode_horizon"]) == 2.0
    converted = load_into(tvm.resnet50(num_classes=10), state).eval()
    assert is_ode_form(converted)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        assert float((converted(x) - reference).abs().max() / reference.abs().max()) <= 1e-5


def test_convert_cli_error_leaves_no_output_and_keeps_existing(tmp_path, capsys):
    torch.save(tvm.resnet18().state_dict(), tmp_path / "r18.pth")
    (tmp_path / "out.pt").write_bytes(b"keep me")
    status = main(
        [
            "convert",
            "--arch",
            "resnet50",
            "--weights",
            str(tmp_path / "r18.pth"),
            "--out",
            str(tmp_path / "out.pt"),
        ]
    )
    assert status == 2
    assert "missing key(s)" in capsys.readouterr().err
    assert (tmp_path / "out.pt").read_bytes() == b"keep me"
    assert files(tmp_path) == ["out.pt", "r18.pth"]
    status = main(
        [
            "convert",
            "--arch",
            "resnet18",
            "--weights",
            str(tmp_path / "r18.pth"),
            "--out",
            str(tmp_path / "new.pt"),
            "--horizon",
            "-1",
        ]
    )
    assert status == 2 and "horizon" in capsys.readouterr().err
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize(
    "marker",
    [
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(float("nan"), dtype=torch.float64),
        torch.tensor(float("inf"), dtype=torch.float64),
        torch.tensor(-1.0, dtype=torch.float64),
        torch.tensor(1e308, dtype=torch.float64),
        torch.tensor(1e-300, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        torch.ones(0, dtype=torch.float64),
    ],
    ids=["zero", "nan", "inf", "negative", "1e308", "1e-300", "vector", "empty"],
)
def test_bad_stage_markers_are_refused_naming_the_key(marker):
    state = to_ode_form(tvm.resnet18(num_classes=4)).state_dict()
    state["layer1.ode_horizon"] = marker
    model = tvm.resnet18(num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="marker 'layer1.ode_horizon'"):
        load_into(model, state)
    assert not is_ode_form(model)  # nothing converted before the refusal
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_strip_prefix_is_linear_in_the_keys():
    """4,000 keys of 40 parts took 100-145 s with every prefix tried against every key."""
    model = tvm.resnet18()
    keys = [".".join(f"p{part}x{key}" for part in range(40)) for key in range(4000)]
    state = {key: torch.zeros(1) for key in keys}
    state.update({f"module.{k}": v for k, v in model.state_dict().items()})
    started = time.perf_counter()
    stripped = strip_prefix(state, model)
    assert time.perf_counter() - started < 2
    assert stripped.keys() == model.state_dict().keys()
    # the shortest of equally good prefixes wins; no match keeps the keys as they are
    assert strip_prefix({"a.b.fc.bias": 1, "c.fc.weight": 2}, torch.nn.Sequential()) == {
        "a.b.fc.bias": 1,
        "c.fc.weight": 2,
    }


def test_atomic_write_refuses_devices_and_fifos_and_writes_through_links(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO .* would be replaced"):
        atomic_save({"a": torch.zeros(1)}, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    device = tmp_path / "null"  # like /dev/null, which the old code replaced when run as root
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        device = Path("/dev/null") if os.geteuid() else None  # safe to try only as a user
    if device is not None:
        with pytest.raises(ValueError, match="character device"):
            atomic_save({"a": torch.zeros(1)}, device)
        assert stat.S_ISCHR(os.lstat(device).st_mode)
    (tmp_path / "real.pt").write_bytes(b"old")
    (tmp_path / "link.pt").symlink_to("real.pt")
    atomic_save({"a": torch.ones(1)}, tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink()
    assert torch.load(tmp_path / "real.pt", weights_only=True)["a"].item() == 1.0
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere" / "x.pt")
    with pytest.raises(FileNotFoundError, match="a link to .*nowhere.* does not exist"):
        atomic_save({}, tmp_path / "dangling.pt")
    assert {"dangling.pt", "fifo", "link.pt", "real.pt"} <= set(files(tmp_path))
    assert not any(name.endswith(".resode-partial") for name in files(tmp_path))


def test_killed_writes_leave_named_files_that_the_next_write_removes(tmp_path):
    target = tmp_path / "model.pt"
    seen = []

    def write(file):
        seen.extend(p for p in files(tmp_path) if p != "model.pt")
        file.write(b"new")

    atomic_write(target, write)
    (temporary,) = seen
    assert re.fullmatch(r"\.model\.pt\.[0-9a-f]{16}\.resode-partial", temporary)
    stale = tmp_path / ".model.pt.0123456789abcdef.resode-partial"
    live = tmp_path / ".model.pt.fedcba9876543210.resode-partial"
    other = tmp_path / ".other.pt.0123456789abcdef.resode-partial"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    with open(live, "rb") as writer:  # a write in progress holds its lock
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        atomic_write(target, lambda file: file.write(b"newer"))
    assert files(tmp_path) == [live.name, other.name, "model.pt"]
    assert target.read_bytes() == b"newer"


def test_unwritable_directories_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=r"directory .* is not writable"):
        atomic_save({}, tmp_path / "out.pt")
    monkeypatch.undo()

    def immutable(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "open", immutable)
    with pytest.raises(PermissionError, match=r"creating a file in .* failed \(Operation not"):
        atomic_save({}, tmp_path / "out.pt")
    assert files(tmp_path) == []


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_bytes_not_yet_written_are_checked_as_their_file_would_be(tmp_path, zipped):
    """save_neural_ode reads its content back through the safe reader before writing it."""
    path = tmp_path / "not-written.pt"
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, buffer, _use_new_zipfile_serialization=zipped)
    assert safe_torch_load(path, data=buffer.getvalue())["w"].tolist() == [0.0, 1.0, 2.0]
    shared = torch.ones(4)
    buffer = io.BytesIO()
    torch.save({"a": shared, "b": shared}, buffer, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match=f"{path} holds tensors .* that share memory"):
        safe_torch_load(path, data=buffer.getvalue())
    with pytest.raises(CheckpointError, match=f"{path} (is not a readable|declares .* bytes)"):
        safe_torch_load(path, data=buffer.getvalue()[:-9])
    with pytest.raises(CheckpointError, match=f"{path} is empty"):
        safe_torch_load(path, data=b"")
    assert files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_torch_load(path)


def test_a_ckpt_path_is_read_once_by_the_safe_reader(tmp_path, monkeypatch):
    """resode fit|validate|test|predict --ckpt_path read the file twice: checked, then loaded."""
    path = tmp_path / "last.ckpt"
    content = {
        "state_dict": {"model.w": torch.ones(2)},
        "pytorch-lightning_version": pl.__version__,
        "epoch": 1,
        "global_step": 3,
        "hyper_parameters": {},
    }
    torch.save(content, path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    read = read_checkpoint(path, "validate")
    assert len(loads) == 1 and torch.equal(read["state_dict"]["model.w"], torch.ones(2))
    torch.save({**content, "state_dict": {0: torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="has a key 0 of type int"):
        read_checkpoint(path, "validate")
    torch.save(content["state_dict"], path)
    with pytest.raises(CheckpointError, match="holds weights only, not a Lightning checkpoint"):
        read_checkpoint(path, "validate")
