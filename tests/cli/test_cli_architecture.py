"""One ``--arch`` spec for every subcommand: torchvision names, ``ode_resnet``, ``timm:NAME`` and
the user's own ``package.module:callable``, each refused in one line when it names nothing."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from helpers.cli import one_line_error

from resode_lightning.cli import main
from resode_lightning.cli.architecture import architecture
from resode_lightning.core.models import ode_resnet
from resode_lightning.core.odeform import is_ode_form, load_into, to_ode_form
from resode_lightning.testing import randomize_norms

NETS = '''
import torch
from torch import nn
import torch.nn.functional as F

CONSTANT = 3


class Shortcut(nn.Module):
    """Option A: subsample and pad with zero channels."""

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class Block(nn.Module):
    def __init__(self, inputs, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = Shortcut(planes) if stride != 1 or inputs != planes else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, inputs = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            strides = [stride] + [1] * (blocks - 1)
            layer = []
            for s in strides:
                layer.append(Block(inputs, planes, s))
                inputs = planes
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet56(num_classes=10):
    return CifarResNet(9, num_classes)


def resnet8(num_classes=10):
    return CifarResNet(1, num_classes)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's package ``mypkg`` in the folder the command runs in, unknown to the package."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(NETS))
    (package / "broken.py").write_text("raise RuntimeError('the import fails')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["resode"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command adds the current folder
    importlib.invalidate_caches()
    yield tmp_path
    for name in [name for name in sys.modules if name.split(".")[0] == "mypkg"]:
        del sys.modules[name]


def _user_model(name: str, **kwargs) -> torch.nn.Module:
    """The user's model, built as they would build it, with random norms."""
    builder = architecture(f"mypkg.nets:{name}").builder
    torch.manual_seed(0)
    return randomize_norms(builder(**kwargs).eval())


def test_convert_builds_the_users_own_architecture(user_package, capsys):
    model = _user_model("resnet56", num_classes=7)
    torch.save(model.state_dict(), user_package / "net.pth")
    args = ["convert", "--arch", "mypkg.nets:resnet56", "--arch-kwargs", '{"num_classes": 7}']
    assert main([*args, "--weights", "net.pth", "--out", "ode.pth"]) == 0
    assert "converted mypkg.nets:resnet56 to ODE form" in capsys.readouterr().out
    state = torch.load(user_package / "ode.pth", weights_only=True)
    converted = to_ode_form(_user_model("resnet56", num_classes=7))
    assert state.keys() == converted.state_dict().keys()
    reloaded = load_into(_user_model("resnet56", num_classes=7), state)  # adopts the ODE form
    assert is_ode_form(reloaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_export_and_smoothness_take_the_same_spec(user_package, capsys):
    torch.save(_user_model("resnet56").state_dict(), user_package / "net.pth")
    arch = ["--arch", "mypkg.nets:resnet56"]
    assert main(["smoothness", "net.pth", *arch]) == 0
    assert "net.pth: mypkg.nets:resnet56" in capsys.readouterr().out
    assert main(["export", *arch, "--weights", "net.pth", "--out", "ode.pt", "--size", "32"]) == 0
    assert "exported mypkg.nets:resnet56 as a neural ODE" in capsys.readouterr().out


def test_ode_resnet_and_timm_specs_read_their_sizes_from_the_checkpoint(tmp_path, capsys):
    net = ode_resnet(depths=[3], widths=[8], num_classes=5, in_channels=1, seed=0).eval()
    torch.save(net.state_dict(), tmp_path / "ode.pth")
    kwargs = '{"depths": [3], "widths": [8]}'
    args = ["--arch", "ode_resnet", "--arch-kwargs", kwargs, "--weights", str(tmp_path / "ode.pth")]
    assert main(["convert", *args, "--out", str(tmp_path / "out.pth")]) == 0
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18d", num_classes=4, in_chans=1).eval()
    torch.save(model.state_dict(), tmp_path / "t.pth")
    args = ["--arch", "timm:resnet18d", "--weights", str(tmp_path / "t.pth")]
    assert main(["export", *args, "--out", str(tmp_path / "t.pt"), "--size", "32"]) == 0
    assert "exported timm:resnet18d" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("resnet99", "unknown architecture 'resnet99': give a torchvision ResNet"),
        ("mypkg.nets", "unknown architecture 'mypkg.nets'"),
        (":resnet56", "unknown architecture"),
        ("nopkg.nets:resnet56", "no module named 'nopkg'"),
        ("mypkg.nets:missing", "module mypkg.nets has no attribute 'missing'"),
        ("mypkg.nets:CONSTANT", "has a non-callable 'CONSTANT'"),
        ("mypkg.broken:net", "importing mypkg.broken failed: RuntimeError: the import fails"),
        ("timm:no_such_net", "has no model 'no_such_net'"),
    ],
)
@pytest.mark.parametrize("command", ["convert", "export", "smoothness", "distill"])
def test_a_bad_spec_gets_one_line_and_status_2(command, spec, expected, user_package, capsys):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    args = {
        "convert": ["convert", "--weights", "w.pth", "--out", "o.pth"],
        "export": ["export", "--weights", "w.pth", "--out", "o.pth"],
        "smoothness": ["smoothness", "w.pth"],
        "distill": ["distill", "--weights", "w.pth", "--data", "digits", "--out", "o.pt"],
    }[command]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--arch", spec])
    assert exit_.value.code == 2
    one_line_error(capsys.readouterr(), command, "--arch", expected)
    assert sorted(p.name for p in user_package.iterdir()) == ["mypkg"]


def test_builder_refusals_and_sizes_the_checkpoint_decides_get_one_line(user_package, capsys):
    torch.save(_user_model("resnet8").state_dict(), user_package / "net.pth")
    cases = {
        ("mypkg.nets:resnet8", '{"depth": 3}'): "cannot be built with --arch-kwargs",
        ("resnet18", '{"num_classes": 3}'): "sets num_classes, which the checkpoint decides",
        ("ode_resnet", '{"depths": [100000]}'): "depths must be a non-empty list of ints",
        ("mypkg.nets:resnet56", "{}"): "net.pth",  # the file does not fit the architecture
    }
    for (spec, kwargs), expected in cases.items():
        args = ["--arch", spec, "--arch-kwargs", kwargs, "--weights", "net.pth", "--out", "o.pth"]
        assert main(["convert", *args]) == 2
        one_line_error(capsys.readouterr(), "convert", expected)
    assert not (user_package / "o.pth").exists()
