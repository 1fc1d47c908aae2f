"""Run-time steps of exports: set_steps, at_steps, accuracy_vs_steps."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from resode_lightning import (
    export_neural_ode,
    load_neural_ode,
    ode_resnet,
    save_neural_ode,
)
from resode_lightning.export.anytime import (
    accuracy_vs_steps,
    at_steps,
    field_evaluations,
    set_steps,
    steps_of,
)
from resode_lightning.testing import randomize_norms


def _net(depths=(8, 4), widths=(4, 8), init="iid", seed=0):
    return randomize_norms(ode_resnet(depths=depths, widths=widths, init=init, seed=seed)).eval()


def _count_branch_calls(exported):
    """Counts the calls of every stage's branch (the grids' branch modules copy the hook)."""
    calls = []
    for module in exported.modules():
        if type(module).__name__ == "NeuralODEStage":
            conv = module.field.template.block.conv1
            conv.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


# ----------------------------------------------------------------------------- run-time steps


def test_set_steps_takes_ints_fractions_and_dicts_and_matches_a_fresh_export():
    net = _net()
    x = torch.randn(3, 3, 16, 16)
    ode = export_neural_ode(net)
    with torch.no_grad():
        full = ode(x)
        assert steps_of(ode) == {"stages.0": ("euler", 8), "stages.1": ("euler", 4)}
        previous = set_steps(ode, 0.25)
        assert previous == {"stages.0": ("euler", 8), "stages.1": ("euler", 4)}
        assert steps_of(ode) == {"stages.0": ("euler", 2), "stages.1": ("euler", 1)}
        torch.testing.assert_close(ode(x), export_neural_ode(net, steps=0.25)(x))
        set_steps(ode, 3)
        assert steps_of(ode) == {"stages.0": ("euler", 3), "stages.1": ("euler", 3)}
        set_steps(ode, {"stages.1": 2}, method="rk4")
        assert steps_of(ode) == {"stages.0": ("rk4", 3), "stages.1": ("rk4", 2)}
        expected = export_neural_ode(net, method="rk4", steps={"stages.0": 3, "stages.1": 2})
        torch.testing.assert_close(ode(x), expected(x))
        set_steps(ode, 1.0, method="euler")
        torch.testing.assert_close(ode(x), full, rtol=0, atol=0)


def test_steps_change_the_field_evaluations_and_the_context_restores_them():
    ode = export_neural_ode(_net(depths=(8,), widths=(4,)))
    calls = _count_branch_calls(ode)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ode(x)
        assert len(calls) == 8 == field_evaluations(ode)
        calls.clear()
        with at_steps(ode, 0.5):
            ode(x)
            assert len(calls) == 4 == field_evaluations(ode)
        calls.clear()
        with at_steps(ode, 1, method="rk4"):
            ode(x)
            assert len(calls) == 4 == field_evaluations(ode)
        assert steps_of(ode) == {"stages.0": ("euler", 8)}
        with pytest.raises(RuntimeError, match="inside"), at_steps(ode, 2):
            raise RuntimeError("inside")
        assert steps_of(ode) == {"stages.0": ("euler", 8)}
        calls.clear()
        ode(x)
        assert len(calls) == 8


def test_a_loaded_export_takes_steps_at_run_time(tmp_path):
    net = _net()
    path = save_neural_ode(export_neural_ode(net), tmp_path / "ode.pt")
    loaded = load_neural_ode(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), at_steps(loaded, 0.5):
        torch.testing.assert_close(loaded(x), export_neural_ode(net, steps=0.5)(x))


def test_set_steps_rejects_bad_budgets_and_adaptive_stages():
    ode = export_neural_ode(_net())
    for bad in (0, -1, 0.0, True, "4", {"stages.0": 0}, {"nope": 2}):
        with pytest.raises(ValueError):
            set_steps(ode, bad)
    with pytest.raises(ValueError, match="fixed-grid"):
        set_steps(ode, 2, method="dopri5")
    adaptive = export_neural_ode(_net(), method="dopri5")
    with pytest.raises(ValueError, match="adaptive"):
        set_steps(adaptive, 2)
    set_steps(adaptive, 2, method="euler")
    assert steps_of(adaptive) == {"stages.0": ("euler", 2), "stages.1": ("euler", 2)}
    with pytest.raises(ValueError, match="NeuralODEStage"):
        set_steps(torch.nn.Linear(2, 2), 2)
    assert steps_of(ode) == {"stages.0": ("euler", 8), "stages.1": ("euler", 4)}


def test_accuracy_vs_steps_scores_every_setting_and_restores_the_model():
    net = _net(depths=(8,), widths=(4,))
    ode = export_neural_ode(net)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (20,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    rows = accuracy_vs_steps(ode, loader, [1.0, 0.25, ("rk4", 0.25)], reference=net)
    assert [row["setting"] for row in rows] == ["reference", "1", "0.25", "rk4 0.25"]
    assert [row["evaluations"] for row in rows] == [None, 8, 2, 8]
    assert [row["steps"] for row in rows[1:]] == [{"stages.0": 8}, {"stages.0": 2}, {"stages.0": 2}]
    with torch.no_grad():
        for row, model in zip(rows, [net, ode, export_neural_ode(net, steps=2)]):
            expected = (model(images).argmax(1) == labels).double().mean().item()
            assert row["accuracy"] == pytest.approx(expected)
    assert rows[0]["latency_ratio"] == 1.0 and all(row["latency_ms"] > 0 for row in rows)
    assert rows[0]["accuracy"] == rows[1]["accuracy"] and rows[0]["images"] == 20
    assert steps_of(ode) == {"stages.0": ("euler", 8)}
    with pytest.raises(ValueError, match="warmup"):
        accuracy_vs_steps(ode, loader, [1.0], warmup=3)
