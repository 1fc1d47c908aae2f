"""Neural ODE export: exactness on the original grid, gradients per mode, save/load, errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers.runif import RunIf
from torch import nn

from resode_lightning import (
    CheckpointError,
    DeployedStage,
    NeuralODEExport,
    deployable,
    export_neural_ode,
    load_neural_ode,
    ode_resnet,
    save_neural_ode,
    to_ode_form,
)
from resode_lightning.cli import main
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.core.stages import find_stages
from resode_lightning.export.options import Backprop, PiecewiseLinear
from resode_lightning.export.solve import NeuralODEStage


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding BN matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                module.weight.copy_(1 + 0.3 * torch.randn(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
    return model.eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ode_stages(model: nn.Module) -> list[NeuralODEStage]:
    return [m for m in model.modules() if isinstance(m, NeuralODEStage)]


def small_ode_resnet(init: str = "iid", dtype: torch.dtype = torch.float32) -> nn.Module:
    model = ode_resnet(depths=(4, 3), widths=(4, 8), init=init, seed=0)
    return randomize_bn(model).to(dtype)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("interpolation", ["linear", "constant"])
def test_euler_on_original_grid_reproduces_torchvision(arch, interpolation):
    model = randomize_bn(torchvision_resnet(arch, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for fold_bn in (True, False):
            exported = export_neural_ode(model, interpolation=interpolation, fold_bn=fold_bn)
            assert ode_stages(exported), "no stage was exported"
            assert relative(exported(x), expected) <= 1e-5


def test_euler_reproduces_ode_form_source_and_ode_resnet():
    tv = randomize_bn(torchvision_resnet("resnet18", num_classes=10))
    source = to_ode_form(tv, horizon=2.0)
    model = small_ode_resnet()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert relative(export_neural_ode(source)(x), tv(x)) <= 1e-5
        assert float(ode_stages(export_neural_ode(source))[0].horizon) == 2.0
        for interpolation in ("linear", "constant"):
            exported = export_neural_ode(model, interpolation=interpolation)
            assert relative(exported(x), model(x)) <= 1e-5
        assert (
            relative(export_neural_ode(model, knots=3)(x[:, :, :8, :8]), model(x[:, :, :8, :8])) < 1
        )


def test_export_keeps_the_source_and_folds_bn_where_weights_are_bound():
    model = small_ode_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exported = export_neural_ode(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    stage = ode_stages(exported)[0]
    # the path holds the unfolded tensors, so every step count interpolates the blocks
    assert {"conv1.weight", "bn1.weight", "bn1.running_var"} <= set(stage.field.path.names)
    assert stage.field.path.knots("conv1.weight").shape == (4, 4, 4, 3, 3)
    # what inference binds is folded: no BatchNorm is left in the deployed stage
    deployed = deployable(exported, steps=3)
    stages = [m for m in deployed.modules() if isinstance(m, DeployedStage)]
    assert stages and not any(isinstance(m, nn.BatchNorm2d) for m in stages[0].modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        unfolded = export_neural_ode(model, fold_bn=False, steps=3)
        assert relative(deployed(x), unfolded(x)) <= 1e-5
    assert not exported.training


def _knot_grads(exported: nn.Module) -> torch.Tensor:
    grads = []
    for stage in ode_stages(exported):
        path = stage.field.path
        for k in range(path.count):
            grads += [
                path.knots(n).grad[k].flatten() for n in path.names if path.knots(n).requires_grad
            ]
    return torch.cat(grads)


def _block_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [p.grad.flatten() for s in find_stages(model) for b in s.blocks for p in b.parameters()]
    )


def _gradient_error(model: nn.Module, x: torch.Tensor, **options) -> float:
    """Relative error of the export's knot gradients vs backprop through the source (ODE form)."""
    reference = to_ode_form(model)
    reference(x).square().sum().backward()
    expected = _block_grads(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exported = export_neural_ode(model, fold_bn=False, **options)
    exported(x).square().sum().backward()
    return float((_knot_grads(exported) - expected).norm() / expected.norm())


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
@pytest.mark.parametrize("interpolation", ["linear", "constant"])
def test_exact_gradient_modes_match_the_source_in_float64(gradient, interpolation):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = small_ode_resnet(dtype=torch.float64)
    assert _gradient_error(model, x, gradient=gradient, interpolation=interpolation) < 1e-10
    tv = randomize_bn(torchvision_resnet("resnet18", num_classes=4)).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert _gradient_error(tv, x, gradient=gradient, interpolation=interpolation) < 1e-10


def test_adjoint_gradients_measured_errors():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = small_ode_resnet(init="smooth", dtype=torch.float64)
    # the literal ResNet grid (Euler, a few coarse steps): the continuous adjoint is badly off
    assert 0.1 < _gradient_error(model, x, gradient="adjoint") < 1.0

    def grads(gradient: str) -> torch.Tensor:
        exported = export_neural_ode(model, method="rk4", gradient=gradient, fold_bn=False)
        exported(x).square().sum().backward()
        return _knot_grads(exported)

    # rk4 with a linear path: close to the exact gradient of the same solve
    exact, adjoint = grads("backprop"), grads("adjoint")
    assert float((adjoint - exact).norm() / exact.norm()) < 1e-2


def test_adjoint_warns_for_inexact_combinations():
    with pytest.warns(UserWarning, match="post-activation"):
        export_neural_ode(
            torchvision_resnet("resnet18", num_classes=4).eval(), gradient="adjoint", method="rk4"
        )
    with pytest.warns(UserWarning, match="low-order"):
        export_neural_ode(small_ode_resnet(), gradient="adjoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_neural_ode(small_ode_resnet(), gradient="adjoint", method="rk4")


@pytest.mark.parametrize(
    ("method", "steps"),
    [("euler", 0.5), ("rk4", None), ("midpoint", {"stages.0": 2}), ("dopri5", None)],
)
@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_other_solvers_run_and_stay_close(method, steps, gradient):
    model = ode_resnet(depths=(4,), widths=(4,), init="smooth", seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exported = export_neural_ode(model, method=method, steps=steps, gradient=gradient)
    y = exported(x)
    y.sum().backward()
    assert relative(y.detach(), model(x).detach()) < 0.05
    assert all(p.grad is not None for p in exported.parameters() if p.requires_grad)


def test_autocast_bfloat16_and_half_precision_errors():
    model = small_ode_resnet()
    x = torch.randn(2, 3, 8, 8)
    for method in ("euler", "dopri5"):
        exported = export_neural_ode(model, method=method)
        with torch.no_grad():
            expected = exported(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = exported(x)
        assert y.dtype == torch.bfloat16
        assert relative(y.float(), expected) < 0.02  # bf16 rounding only (measured 2.7e-3)
    with pytest.raises(ValueError, match="cannot integrate a torch.float16 state"):
        export_neural_ode(model, method="dopri5").half()(x.half())


def test_save_load_round_trip_without_pickle(tmp_path):
    model = small_ode_resnet()
    exported = export_neural_ode(
        model, method="rk4", interpolation=PiecewiseLinear(knots=3), gradient=Backprop()
    )
    path = save_neural_ode(exported, tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    content = torch.load(path, weights_only=True)
    assert set(content) == {"config", "state_dict"}
    loaded = load_neural_ode(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))
    assert ode_stages(loaded)[0].field.path.count == 3
    tv = export_neural_ode(
        randomize_bn(torchvision_resnet("resnet18", num_classes=3)), fold_bn=False
    )
    save_neural_ode(tv, tmp_path / "tv.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_neural_ode(tmp_path / "tv.pt")(x), tv(x))


def test_knots_count_parameters():
    model = ode_resnet(depths=(8,), widths=(4,), init="smooth", seed=0).eval()
    full = export_neural_ode(model)
    fitted = export_neural_ode(model, knots=2)
    path = ode_stages(fitted)[0].field.path
    assert path.count == 2
    stage_params = sum(p.numel() for p in ode_stages(full)[0].parameters())
    assert sum(p.numel() for p in ode_stages(fitted)[0].parameters()) * 4 == stage_params


def test_error_paths(tmp_path):
    model = small_ode_resnet()
    with pytest.raises(ValueError, match="steps=4 is for fixed-grid methods"):
        export_neural_ode(model, method="dopri5", steps=4)
    with pytest.raises(ValueError, match="knots=4 exceeds the depth 3 of stage 'stages.1'"):
        export_neural_ode(model, knots=4)
    with pytest.raises(ValueError, match="knots=2 is an argument of interpolation='linear'"):
        export_neural_ode(model, knots=2, interpolation="constant")
    with pytest.raises(ValueError, match="No residual stage found in Sequential"):
        export_neural_ode(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="method must be"):
        export_neural_ode(model, method="leapfrog")
    with pytest.raises(ValueError, match="unknown stage"):
        export_neural_ode(model, steps={"layer9": 2})

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body(x)

    save_neural_ode(export_neural_ode(Wrapper()), tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="pass model=<a fresh .*Wrapper"):
        load_neural_ode(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not made by export_neural_ode"):
        save_neural_ode(model, tmp_path / "y.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_cli_export(tmp_path, capsys):
    model = randomize_bn(torchvision_resnet("resnet18", num_classes=5))
    torch.save(model.state_dict(), tmp_path / "in.pth")
    out = tmp_path / "ode.pt"
    argv = [
        "export",
        "--arch",
        "resnet18",
        "--weights",
        str(tmp_path / "in.pth"),
        "--out",
        str(out),
    ]
    assert main([*argv, "--method", "rk4", "--steps", "0.5", "--size", "32"]) == 0
    assert "exported resnet18" in capsys.readouterr().out
    assert isinstance(load_neural_ode(out), nn.Module)
    assert main([*argv, "--method", "dopri5", "--steps", "3"]) == 2
    assert "steps=3 is for fixed-grid methods" in capsys.readouterr().err


def test_callback_exports_at_fit_end(tmp_path):
    from helpers.boring import NestedBackboneModule, loader, quiet_trainer

    with pytest.raises(ValueError, match="knots must be"):
        NeuralODEExport(tmp_path / "x.pt", knots=1)
    module = NestedBackboneModule(ode_resnet(depths=(2,), widths=(4,), seed=0))
    path = tmp_path / "out" / "ode.pt"
    trainer = quiet_trainer(max_steps=1, callbacks=[NeuralODEExport(path, method="rk4")])
    trainer.fit(module, loader(count=4, size=8))
    loaded = load_neural_ode(path)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = export_neural_ode(module.net["backbone"], method="rk4")(x)
        assert torch.allclose(loaded(x), expected)


def test_callback_writes_nothing_after_weights_went_non_finite(tmp_path):
    from helpers.boring import NestedBackboneModule, loader, quiet_trainer

    class Diverging(NestedBackboneModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 2 else loss  # the third diverges

    path = tmp_path / "ode.pt"
    path.write_bytes(b"previous export")
    module = Diverging(ode_resnet(depths=(2,), widths=(4,), seed=0))
    trainer = quiet_trainer(max_steps=4, callbacks=[NeuralODEExport(path)])
    with pytest.warns(UserWarning, match=r"went NaN or infinite \(first after global step 3\)"):
        trainer.fit(module, loader(count=8, size=8))
    assert path.read_bytes() == b"previous export"


@pytest.mark.parametrize("kind", ["fifo", "under a file"])
def test_callback_refuses_an_unwritable_path_before_training(tmp_path, kind):
    from helpers.boring import NestedBackboneModule, loader, quiet_trainer

    if kind == "fifo":
        path = tmp_path / "ode.pt"
        os.mkfifo(path)
    else:
        (tmp_path / "file").write_text("not a folder")
        path = tmp_path / "file" / "ode.pt"
    module = NestedBackboneModule(ode_resnet(depths=(2,), widths=(4,), seed=0))
    trainer = quiet_trainer(max_steps=1, callbacks=[NeuralODEExport(path)])
    with pytest.raises(ValueError, match=r"NeuralODEExport: .*(a FIFO|not a directory|exists)"):
        trainer.fit(module, loader(count=4, size=8))
    assert trainer.global_step == 0


@RunIf(cuda=True)
def test_cuda_export_matches_and_adjoint_memory_is_flat():
    from resode_lightning.apps.memory_benchmark import memory_benchmark

    model = small_ode_resnet().cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():
        assert relative(export_neural_ode(model)(x), model(x)) <= 1e-5
    result = memory_benchmark((4, 64), ("adjoint",), device="cuda", repeats=1)
    assert result["ratios"]["adjoint_peak_ratio_max_over_min_steps"] <= 1.2


def test_a_modified_torchvision_resnet_loads_from_its_skeleton_not_misloaded(tmp_path):
    """A new stem or pooling is not a torchvision spec: load only from a skeleton that has it."""
    model = torchvision_resnet("resnet18", num_classes=4)
    model.maxpool = torch.nn.Identity()
    exported = export_neural_ode(model.eval())
    path = save_neural_ode(exported, tmp_path / "modified.pt")
    with pytest.raises(CheckpointError, match="pass model="):
        load_neural_ode(path)
    with pytest.raises(CheckpointError, match="maxpool"):
        load_neural_ode(path, model=torchvision_resnet("resnet18", num_classes=4))
    skeleton = torchvision_resnet("resnet18", num_classes=4)
    skeleton.maxpool = torch.nn.Identity()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_neural_ode(path, model=skeleton)(x), exported(x))


def test_the_saved_config_says_whether_batchnorm_was_folded():
    from resode_lightning.export.build import exported_config

    assert exported_config(export_neural_ode(small_ode_resnet()))["export"]["fold_bn"] is True
    plain = ode_resnet(depths=(3,), widths=(4,), norm=False)  # nothing to fold
    assert exported_config(export_neural_ode(plain))["export"]["fold_bn"] is False
