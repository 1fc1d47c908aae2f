"""Smoothness metrics, report, depth-consistency probe, heatmap, `resode smoothness`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from resode_lightning import ode_resnet, plot_smoothness, smoothness_report, to_ode_form
from resode_lightning.cli import main
from resode_lightning.core.metrics import (
    ALL,
    METRICS,
    depth_consistency,
    metric_table,
    smoothness_metrics,
)
from resode_lightning.core.models import torchvision_resnet
from resode_lightning.core.parameters import stage_parameters, stage_tensors
from resode_lightning.core.stages import find_stages


def hand_metrics(blocks: list[torch.Tensor]) -> dict[str, float]:
    """docs/theory.md's metrics by a plain float64 loop over the blocks of one parameter set."""
    theta = [b.double().flatten() for b in blocks]
    depth = len(theta)
    norms = [float(t.norm()) for t in theta]
    steps = [float((theta[k + 1] - theta[k]).norm()) for k in range(depth - 1)]
    curls = [
        float((theta[k + 1] - 2 * theta[k] + theta[k - 1]).norm()) for k in range(1, depth - 1)
    ]
    rms = math.sqrt(sum(n * n for n in norms) / depth)
    return {
        "weight_norm": max(norms),
        "lipschitz": depth * max(steps),
        "total_variation": sum(steps),
        "relative_roughness": (sum(steps) / len(steps)) / (math.sqrt(2) * rms),
        "curvature": depth**2 * max(curls) if curls else math.nan,
    }


def random_stack(depth: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (3, 2, 3, 3), "bn.weight": (3,), "bn.bias": (3,)}
    return {
        n: [torch.randn(s, generator=generator) for _ in range(depth)] for n, s in shapes.items()
    }


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-6)


@pytest.mark.parametrize("depth", [2, 3, 6])
def test_metrics_match_a_hand_loop(depth):
    stack = random_stack(depth)
    scale = {"bn.weight": float(depth), "bn.bias": float(depth)}
    table, profile = metric_table(stack, scale)
    scaled = {n: [t * scale.get(n, 1.0) for t in ts] for n, ts in stack.items()}
    everything = [torch.cat([scaled[n][k].flatten() for n in scaled]) for k in range(depth)]
    expected = {ALL: hand_metrics(everything)} | {n: hand_metrics(ts) for n, ts in scaled.items()}
    reference = smoothness_metrics({n: torch.stack(ts) for n, ts in scaled.items()})
    assert table.shape == (1 + len(stack), len(METRICS)) and table.dtype == torch.float32
    for row, name in enumerate([ALL, *stack]):
        for column, metric in enumerate(METRICS):
            assert close(float(table[row, column]), expected[name][metric]), (name, metric)
            assert close(float(reference[name][metric]), expected[name][metric]), (name, metric)
    hand_profile = [float((everything[k + 1] - everything[k]).norm()) for k in range(depth - 1)]
    assert profile.tolist() == pytest.approx(hand_profile, rel=1e-5)


def test_constant_weights_are_perfectly_smooth():
    stack = {"w": [torch.full((4, 4), 0.5)] * 7, "b": [torch.ones(4)] * 7}
    table, profile = metric_table(stack)
    values = dict(zip(METRICS, table[0].tolist(), strict=True))
    assert values["weight_norm"] == pytest.approx(math.sqrt(16 * 0.25 + 4))
    for metric in ("lipschitz", "total_variation", "relative_roughness", "curvature"):
        assert values[metric] == 0.0
    assert profile.tolist() == [0.0] * 6


def test_lipschitz_is_bounded_in_depth_for_smooth_weights_and_linear_for_iid():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    smooth, iid = [], []
    for depth in (8, 32, 128):
        times = [k / depth for k in range(depth)]
        smooth.append(
            float(metric_table({"w": [b + math.sin(2 * math.pi * t) * a for t in times]})[0][0, 1])
        )
        iid.append(
            float(
                metric_table({"w": [torch.randn(64, generator=generator) for _ in times]})[0][0, 1]
            )
        )
    # smooth: L·max||Δθ|| → 2π·||a||; iid: grows like L (×16 from L=8 to 128)
    assert smooth[-1] == pytest.approx(2 * math.pi * float(a.norm()), rel=0.01)
    assert max(smooth) / min(smooth) < 1.2  # discretisation of 2π·||a||·max|cos|
    assert 10 < iid[-1] / iid[0] < 25


def test_stage_metrics_are_the_same_in_plain_and_ode_form():
    plain = torchvision_resnet("resnet50")
    layer3 = find_stages(plain)[2]
    tensors, scale = stage_tensors(layer3)
    assert scale == {"bn3.weight": 5.0, "bn3.bias": 5.0}
    table, _ = metric_table(tensors, scale)
    names = [ALL, *tensors]
    hand = hand_metrics([block.bn3.weight.detach() * 5 for block in layer3.blocks])
    assert float(table[names.index("bn3.weight"), 1]) == pytest.approx(hand["lipschitz"], rel=1e-5)
    same = to_ode_form(plain)
    table_ode, _ = metric_table(*stage_tensors(find_stages(same)[2]))
    torch.testing.assert_close(table_ode, table, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_report_rows_match_stage_metrics():
    model = ode_resnet(depths=(3, 4), widths=(4, 8), init="iid", seed=0)
    rows = smoothness_report(model, per_parameter=True)
    stages = find_stages(model)
    assert [r["stage"] for r in rows if r["parameter"] == ALL] == ["stages.0", "stages.1"]
    first = rows[0]
    assert set(first) == {"stage", "parameter", "depth", "form", "horizon", *METRICS}
    assert (first["depth"], first["form"], first["horizon"]) == (3, "ode", 1.0)
    blocks = stages[0].blocks
    hand = hand_metrics([torch.cat([p.detach().flatten() for p in b.parameters()]) for b in blocks])
    for metric in METRICS:
        assert close(first[metric], hand[metric]), metric
    conv = next(r for r in rows if r["stage"] == "stages.1" and r["parameter"] == "conv2.weight")
    reference = smoothness_metrics(stage_parameters(stages[1]))["conv2.weight"]
    assert conv["lipschitz"] == pytest.approx(float(reference["lipschitz"]))
    assert len(smoothness_report(model)) == 2


def test_report_as_frame():
    model = ode_resnet(depths=(3,), widths=(4,), seed=0)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs pandas"):
            smoothness_report(model, as_frame=True)
    else:
        frame = smoothness_report(model, as_frame=True)
        assert list(frame["stage"]) == ["stages.0"]


def test_report_without_stages_says_how_to_register():
    with pytest.raises(ValueError, match="No residual stage found in Sequential.*register_block"):
        smoothness_report(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_depth_consistency_matches_an_euler_loop_at_half_depth():
    model = ode_resnet(depths=(8,), widths=(4,), init="smooth", seed=0)
    stage = find_stages(model)[0]
    for block in stage.blocks:  # nonzero branches and non-trivial running statistics
        nn.init.normal_(block.bn2.weight)
        block.bn1.running_mean.uniform_(-0.1, 0.1)
    model.train()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float32)
    error = depth_consistency(stage, x)
    assert all(m.training for m in model.modules())  # training flags are restored
    model.eval()
    full, coarse = x.double(), x.double()
    blocks = [b.double() for b in stage.blocks]
    with torch.no_grad():
        for block in blocks:
            full = full + (1 / 8) * block.branch(full)
        for j in range(4):  # knots t_j = j/4 = t_{2j}: the weights of block 2j, step 1/4
            coarse = coarse + (1 / 4) * blocks[2 * j].branch(coarse)
    expected = float((full - coarse).norm() / full.norm())
    model.float()
    assert float(error) == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def history_of(depth: int = 5, steps: int = 4) -> dict:
    return {
        "layer3": {
            "step": torch.arange(1, steps + 1) * 10,
            "parameters": [ALL],
            "metrics": torch.rand(steps, 1, len(METRICS)),
            "depth_profile": torch.rand(steps, depth - 1),
            "probe_step": torch.zeros(0, dtype=torch.int64),
            "depth_consistency": torch.zeros(0),
        }
    }


def test_plot_writes_a_png(tmp_path):
    path = plot_smoothness(history_of(), tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]


def test_plot_errors_leave_no_file(tmp_path):
    empty = history_of(steps=0)
    with pytest.raises(ValueError, match="no measurement"):
        plot_smoothness(empty, tmp_path / "s.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_smoothness(history_of(), tmp_path / "missing" / "s.png")
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_table_of_a_lightning_checkpoint(tmp_path, capsys):
    model = torchvision_resnet("resnet18", num_classes=7)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    assert main(["smoothness", str(path)]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out
    expected = smoothness_report(model)
    lines = out.splitlines()
    for row in expected:
        line = next(line for line in lines if line.startswith(row["stage"] + " "))
        assert f"{row['lipschitz']:.4g}" in line.split()
    assert [r["stage"] for r in expected] == ["layer1"]


def test_cli_reads_an_ode_form_checkpoint_with_the_same_numbers(tmp_path, capsys):
    model = torchvision_resnet("resnet18", num_classes=3)
    torch.save(to_ode_form(model).state_dict(), tmp_path / "ode.pth")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    assert main(["smoothness", str(tmp_path / "plain.pth"), "--arch", "resnet18"]) == 0
    plain = capsys.readouterr().out.splitlines()[1:]
    assert main(["smoothness", str(tmp_path / "ode.pth")]) == 0
    ode = capsys.readouterr().out.splitlines()[1:]
    strip = [[c for c in line.split() if c not in ("ode", "plain")] for line in plain]
    assert strip == [[c for c in line.split() if c not in ("ode", "plain")] for line in ode]


def test_cli_refuses_an_unknown_architecture(tmp_path, capsys):
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "lin.pth")
    assert main(["smoothness", str(tmp_path / "lin.pth")]) == 2
    assert "cannot infer the architecture: no torchvision ResNet matches" in capsys.readouterr().err


def test_a_tensor_that_is_zero_in_every_block_is_perfectly_smooth():
    from resode_lightning.core.metrics import metric_table

    zeros = [torch.zeros(3) for _ in range(4)]
    table, _ = metric_table({"bias": zeros, "weight": [torch.randn(3) for _ in range(4)]})
    assert torch.isfinite(table).all()
    assert (table[1] == 0).all()
