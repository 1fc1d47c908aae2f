"""Shipping an export: graph capture of :func:`deployable`, and one meaning of "n steps"."""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict

import pytest
import torch
from helpers.cli import one_line_error
from helpers.runif import RunIf
from torch import nn
from torchvision.models import resnet18, resnet50, resnet152

from resode_lightning import (
    DeployedStage,
    ExportOptions,
    deployable,
    export_neural_ode,
    load_neural_ode,
    ode_resnet,
    resample_depth,
    save_neural_ode,
    set_steps,
    to_ode_form,
)
from resode_lightning.cli import main as resode
from resode_lightning.core.coarse import coarse_steps
from resode_lightning.core.stages import find_stages
from resode_lightning.export.anytime import steps_of
from resode_lightning.export.build import build_export, exported_config
from resode_lightning.export.serialization import LEGACY_FORMAT
from resode_lightning.testing import randomize_norms

timm = pytest.importorskip("timm")


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _sources() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "ode_resnet": randomize_norms(ode_resnet(depths=(16,), widths=(8,)).eval()),
        "resnet50": randomize_norms(resnet50().eval()),
        "resnet50d": randomize_norms(timm.create_model("resnet50d").eval()),
    }


SOURCES = _sources()
SIZE = {"ode_resnet": 16, "resnet50": 32, "resnet50d": 32}
SETTINGS = [("euler", 1.0), ("euler", 0.5), ("rk4", 1.0), ("rk4", 0.5)]


def _deployed(name: str, method: str, steps: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    export = export_neural_ode(SOURCES[name])
    program = deployable(export, steps=steps, method=method)
    x = torch.randn(2, 3, SIZE[name], SIZE[name], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        set_steps(export, steps, method)
        expected = export(x)
    return program, x, expected


@pytest.mark.parametrize("method, steps", SETTINGS)
@pytest.mark.parametrize("name", list(SOURCES))
def test_deployable_is_the_export_and_survives_every_capture(name, method, steps, tmp_path):
    program, x, expected = _deployed(name, method, steps)
    with torch.no_grad():
        assert relative(program(x), expected) <= 1e-5
        for strict in (True, False):
            captured = torch.export.export(program, (x,), strict=strict).module()
            assert relative(captured(x), expected) <= 1e-5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit.trace is deprecated upstream
            traced = torch.jit.trace(program, (x,), check_trace=False)
        assert relative(traced(x), expected) <= 1e-5
        compiled = torch.compile(program, fullgraph=True, backend="eager")
        assert relative(compiled(x), expected) <= 1e-5
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    torch.onnx.export(program, (x,), path, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert relative(torch.from_numpy(out), expected) <= 1e-5


def test_deployable_compiles_with_inductor_in_one_graph():
    program, x, expected = _deployed("ode_resnet", "rk4", 0.25)
    with torch.no_grad():
        assert relative(torch.compile(program, fullgraph=True)(x), expected) <= 1e-5


def test_capturing_the_export_itself_names_deployable_and_adaptive_methods_are_refused():
    export = export_neural_ode(SOURCES["ode_resnet"])
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(RuntimeError, match="deployable"):
        torch.export.export(export, (x,))
    adaptive = export_neural_ode(SOURCES["ode_resnet"], method="dopri5")
    with pytest.raises(ValueError, match=r"fixed-grid methods \('euler', 'midpoint', .*'rk4'\)"):
        deployable(adaptive)
    with pytest.raises(ValueError, match="fixed-grid"):
        deployable(export, method="dopri5")
    assert steps_of(export) == {"stages.0": ("euler", 16)}  # the export is not modified


def test_deployable_follows_the_device_dtype_and_memory_format_of_the_program():
    program, x, expected = _deployed("resnet50", "euler", 0.5)
    last = program.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert relative(last(x.to(memory_format=torch.channels_last)), expected) <= 1e-5
    stages = [m for m in program.modules() if isinstance(m, DeployedStage)]
    assert len(stages) == 4 and not any(p.requires_grad for m in stages for p in m.parameters())


# ---------------------------------------------------------------- one meaning of "n steps"


def _model(name: str, dtype: torch.dtype) -> tuple[nn.Module, tuple[int, ...]]:
    """A model with the named stage, and the shape of its input."""
    if name == "resnet152.layer3":  # its container alone, 35 identity blocks, narrow groups
        layer3 = randomize_norms(resnet152(width_per_group=16).eval()).layer3
        return nn.Sequential(OrderedDict(layer3=layer3)).to(dtype), (1, 512, 4, 4)
    if name == "resnet50d":
        return SOURCES["resnet50d"].to(dtype), (1, 3, 32, 32)
    depth = int(name.split("=")[1])
    torch.manual_seed(depth)
    return randomize_norms(ode_resnet(depths=(depth,), widths=(6,)).eval()).to(dtype), (
        1,
        3,
        12,
        12,
    )


def _paths_at(
    model: nn.Module, exports: dict[bool, nn.Module], stage_name: str, n: int, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The output of ``model`` with stage ``stage_name`` at ``n`` steps, by every path."""
    outputs = {}
    ode = to_ode_form(model)
    stage = next(s for s in find_stages(ode) if s.name == stage_name)
    with coarse_steps(stage, n):
        outputs["DepthSampling (coarse_steps)"] = ode(x)
    outputs["resample_depth"] = resample_depth(model, {stage_name: n})(x)
    for fold, export in exports.items():
        set_steps(export, {stage_name: n})
        outputs[f"set_steps fold_bn={fold}"] = export(x)
        outputs[f"export fold_bn={fold}"] = export_neural_ode(
            model, steps={stage_name: n}, fold_bn=fold
        )(x)
    outputs["deployable"] = deployable(exports[True])(x)
    return outputs


def _check_paths(name: str, stage_name: str, depth: int, dtype, tolerance: float):
    model, shape = _model(name, dtype)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    exports = {fold: export_neural_ode(model, fold_bn=fold) for fold in (True, False)}
    worst = {}
    with torch.no_grad():
        for n in range(1, depth + 1):
            outputs = _paths_at(model, exports, stage_name, n, x)
            reference = outputs.pop("export fold_bn=False")
            for path, out in outputs.items():
                worst[path] = max(worst.get(path, 0.0), relative(out, reference))
    assert max(worst.values()) <= tolerance, worst


@pytest.mark.parametrize("depth", [7, 12, 16])
def test_every_path_computes_one_function_at_every_step_count(depth):
    _check_paths(f"ode_resnet L={depth}", "stages.0", depth, torch.float32, 1e-5)
    _check_paths(f"ode_resnet L={depth}", "stages.0", depth, torch.float64, 1e-10)


def test_every_path_agrees_on_timm_resnet50d_and_its_torchdiffeq_solve():
    _check_paths("resnet50d", "layer3", 5, torch.float32, 1e-5)
    model = SOURCES["resnet50d"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        grid = export_neural_ode(model, steps={"layer3": 3})(x)
    # the same Euler grid through torchdiffeq (adjoint with gradients never uses the fast path)
    with pytest.warns(UserWarning, match="inexact gradients"):
        solved = export_neural_ode(model, steps={"layer3": 3}, gradient="adjoint")
    assert relative(solved(x).detach(), grid) <= 1e-5


def test_every_path_agrees_on_the_35_blocks_of_resnet152_layer3():
    _check_paths("resnet152.layer3", "layer3", 35, torch.float32, 1e-5)


def test_set_steps_is_what_is_saved_and_loaded(tmp_path):
    export = export_neural_ode(SOURCES["ode_resnet"], method="rk4", steps=8)
    set_steps(export, 2, method="euler")
    save_neural_ode(export, tmp_path / "ode.pt")
    loaded = load_neural_ode(tmp_path / "ode.pt")
    assert steps_of(loaded) == {"stages.0": ("euler", 2)}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert relative(loaded(x), export(x)) <= 1e-6


def test_budgets_have_one_set_of_limits():
    export = export_neural_ode(SOURCES["ode_resnet"])
    for budget in (10**9, 2**63, 0, -1, True, float("inf"), float("nan"), {"stages.0": 10**9}):
        with pytest.raises(ValueError, match="steps"):
            set_steps(export, budget)
        with pytest.raises(ValueError, match="steps"):
            ExportOptions(steps=budget)
    with pytest.raises(ValueError, match="more than 100,000"):
        set_steps(export, 10_000.0)  # a fraction of the depth 16 above the limit
    assert steps_of(export) == {"stages.0": ("euler", 16)}


def test_files_of_format_2_load_as_they_were_written(tmp_path):
    """Format 2 folded BatchNorm into the knots before interpolating: such files keep it."""
    source = SOURCES["ode_resnet"]
    legacy = build_export(source, ExportOptions(steps=5), fold_at_knots=True)
    config = exported_config(legacy)
    state = {k: v.detach().clone() for k, v in legacy.state_dict().items()}
    torch.save(
        {"config": json.dumps({"format": LEGACY_FORMAT, **config}), "state_dict": state},
        tmp_path / "v2.pt",
    )
    loaded = load_neural_ode(tmp_path / "v2.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert relative(loaded(x), legacy(x)) <= 1e-6
        # off the knots, folding first is another function than the current export's
        assert relative(loaded(x), export_neural_ode(source, steps=5)(x)) > 1e-5


# ---------------------------------------------------------------- resode export --format


@RunIf(onnxruntime=True)
def test_cli_writes_an_onnx_file_at_half_the_steps_that_onnxruntime_runs(tmp_path, capsys):
    import onnxruntime

    source = SOURCES["resnet50"]
    torch.save(to_ode_form(source).state_dict(), tmp_path / "ode.pth")
    out = tmp_path / "resnet50.onnx"
    args = ["export", "--arch", "resnet50", "--weights", str(tmp_path / "ode.pth")]
    assert resode([*args, "--out", str(out), "--format", "onnx", "--steps", "0.5"]) == 0
    assert "onnx program" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out))
    x = torch.randn(3, 3, 48, 48)  # another batch size and image size than the probe's
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = export_neural_ode(source, steps=0.5)(x)
    assert relative(torch.from_numpy(actual), expected) <= 1e-5


@pytest.mark.parametrize("format", ["pt2", "torchscript"])
def test_cli_writes_programs_that_load_with_torch(format, tmp_path):
    source = randomize_norms(resnet18().eval())
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    out = tmp_path / f"model.{format}"
    args = ["export", "--arch", "resnet18", "--weights", str(tmp_path / "plain.pth")]
    assert resode([*args, "--out", str(out), "--format", format, "--method", "rk4"]) == 0
    x = torch.randn(5, 3, 48, 48)  # another batch and image size than the probe's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.load(out).module() if format == "pt2" else torch.jit.load(out)
    with torch.no_grad():
        expected = export_neural_ode(source, method="rk4")(x)
        assert relative(program(x), expected) <= 1e-5


def test_cli_refuses_a_bad_format_and_an_adaptive_program_in_one_line(tmp_path, capsys):
    torch.save(resnet18().state_dict(), tmp_path / "plain.pth")
    (tmp_path / "keep.onnx").write_bytes(b"previous")
    args = ["export", "--arch", "resnet18", "--weights", str(tmp_path / "plain.pth")]
    with pytest.raises(SystemExit) as exit_:
        resode([*args, "--out", str(tmp_path / "keep.onnx"), "--format", "tflite"])
    assert exit_.value.code == 2
    one_line_error(capsys.readouterr(), "export", "--format", "tflite", "onnx")
    out = str(tmp_path / "keep.onnx")
    assert resode([*args, "--out", out, "--format", "onnx", "--method", "dopri5"]) == 2
    one_line_error(capsys.readouterr(), "export", "dopri5", "euler")
    assert (tmp_path / "keep.onnx").read_bytes() == b"previous"


# ---------------------------------------------------------------- what the export keeps


def test_the_export_keeps_frozen_parameters_frozen():
    from torchvision.ops import FrozenBatchNorm2d

    source = randomize_norms(resnet18(norm_layer=FrozenBatchNorm2d).eval())
    source.layer1.requires_grad_(False)  # as a detector built with trainable_layers=3 is
    export = export_neural_ode(source)
    paths = {name: m for name, m in export.named_modules() if hasattr(m, "values")}
    assert paths and all(
        p.requires_grad == (not name.startswith("layer1"))
        for name, path in paths.items()
        for p in path.parameters()
    )
    mixed = resnet50()
    mixed.layer3[1].conv1.requires_grad_(False)  # one block of layer3's stage, not the others
    with pytest.raises(ValueError, match="conv1.weight requires gradients in some blocks"):
        export_neural_ode(mixed)


def test_a_training_export_refuses_drop_path_it_cannot_apply():
    source = timm.create_model("resnet18", drop_path_rate=0.5).eval()
    export = export_neural_ode(source)
    with torch.no_grad():
        export(torch.randn(2, 3, 32, 32))  # eval: drop-path is the identity, as in the source
    export.train()
    with pytest.raises(ValueError, match=r"DropPath, rate 0\.\d+.*drop_path_rate=0"):
        export(torch.randn(2, 3, 32, 32))
    export_neural_ode(timm.create_model("resnet18")).train()(torch.randn(2, 3, 32, 32))


def test_an_export_in_channels_last_computes_the_same():
    source = SOURCES["resnet50"]
    x = torch.randn(2, 3, 32, 32)
    export = export_neural_ode(source, steps=0.5)
    with torch.no_grad():
        expected = export(x)
        last = export.to(memory_format=torch.channels_last)
        assert relative(last(x.to(memory_format=torch.channels_last)), expected) <= 1e-5
    knots = next(m for m in last.modules() if hasattr(m, "values")).knots("conv2.weight")
    assert knots[0].is_contiguous(memory_format=torch.channels_last)
    last.train()
    last(x.to(memory_format=torch.channels_last)).sum().backward()  # gradients flow too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ode_resnet", "resnet50"])
def test_an_export_in_half_precision_is_as_close_as_its_source(name, dtype):
    """The grid (knot times, horizon) stays float64 and BatchNorm folds in float32."""
    source = SOURCES[name]
    export = export_neural_ode(source, steps=0.5)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        source_error = relative(copy.deepcopy(source).to(dtype)(x.to(dtype)).float(), source(x))
        export_error = relative(copy.deepcopy(export).to(dtype)(x.to(dtype)).float(), export(x))
    assert export_error <= 1.2 * source_error, (export_error, source_error)
    times = next(m for m in export.to(dtype).modules() if hasattr(m, "values")).times
    assert times.dtype == torch.float64
