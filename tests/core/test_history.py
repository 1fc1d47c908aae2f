"""SmoothnessHistory: appending on device, one host transfer, merging, state, validation, plots."""

from __future__ import annotations

import math

import pytest
import torch

from resode_lightning.core.history import Measurement, SmoothnessHistory
from resode_lightning.core.metrics import ALL, METRICS
from resode_lightning.core.plots import plot_smoothness, smoothness_figure

PARAMETERS = (ALL, "conv.weight")


def measure(stage: str, value: float, depth: int = 4, parameters=PARAMETERS) -> Measurement:
    table = torch.full((len(parameters), len(METRICS)), value)
    return Measurement(stage, parameters, table, torch.full((depth - 1,), value))


def test_appends_move_to_the_host_in_one_transfer(monkeypatch):
    history = SmoothnessHistory()
    for step in (1, 2, 3):
        history.append(step, [measure("a", step), measure("b", 10 * step, depth=2)])
    assert history.pending == 3
    transfers = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: transfers.append(1) or cpu(self))
    drained = history.drain()
    assert len(transfers) == 1 and history.pending == 0
    assert [step for step, _ in drained.measurements] == [1, 2, 3]
    assert drained.measurements[1][1][1].table[0, 0] == 20 and drained.restarted == []
    assert history.drain() == ([], [], [])  # each measurement is handed over once
    assert history.stages == ["a", "b"]
    assert history.steps("b").tolist() == [1, 2, 3]
    assert history.metric("b", "lipschitz", "conv.weight").tolist() == [10, 20, 30]
    assert history.depth_profile("a").shape == (3, 3)
    assert history.parameters("a") == list(PARAMETERS)


def test_an_earlier_step_replaces_what_follows_it():
    history = SmoothnessHistory()
    for step in (1, 2, 3, 4):
        history.append(step, [measure("a", step)])
    history.add_probe(2, {"a": torch.tensor(0.5)})
    history.add_probe(4, {"a": torch.tensor(0.25)})
    resumed = SmoothnessHistory.from_state_dict(history.state_dict())
    resumed.append(3, [measure("a", 30)])
    resumed.add_probe(3, {"a": torch.tensor(0.1)})
    assert resumed.steps("a").tolist() == [1, 2, 3]
    assert resumed.metric("a", "weight_norm").tolist() == [1, 2, 30]
    record = resumed.state_dict()["a"]
    assert record["probe_step"].tolist() == [2, 3]
    assert record["depth_consistency"].tolist() == pytest.approx([0.5, 0.1])


def test_new_parameter_names_restart_the_metrics_and_keep_the_probes():
    history = SmoothnessHistory()
    history.append(1, [measure("a", 1)])
    history.add_probe(1, {"a": torch.tensor(0.5)})
    history.append(2, [measure("a", 2, parameters=(ALL, "other.weight"))])
    assert history.drain().restarted == [("a", 2)]
    assert history.steps("a").tolist() == [2]
    assert history.parameters("a") == [ALL, "other.weight"]
    assert history.state_dict()["a"]["probe_step"].tolist() == [1]
    history.append(3, [measure("a", 3, parameters=(ALL,))])  # a change inside one transfer
    history.append(4, [measure("a", 4, parameters=(ALL, "other.weight"))])
    assert history.drain().restarted == [("a", 3), ("a", 4)]
    assert history.steps("a").tolist() == [4]


def test_a_resampled_stage_pads_its_depth_profiles_with_nan():
    history = SmoothnessHistory()
    history.append(1, [measure("a", 1, depth=3)])
    history.drain()
    history.append(2, [measure("a", 2, depth=5)])
    profile = history.depth_profile("a")
    assert profile.shape == (2, 4)
    assert torch.isnan(profile[0, 2:]).all() and not torch.isnan(profile[1]).any()
    assert history.depth("a").tolist() == [3, 5]
    assert history.metric("a", "lipschitz").tolist() == [1, 2]  # the earlier row is kept
    history.append(3, [measure("a", 3, depth=2)])
    assert history.depth("a").tolist() == [3, 5, 2]
    assert history.depth_profile("a").shape == (3, 4)


def test_readers_name_what_is_missing():
    history = SmoothnessHistory()
    history.append(1, [measure("a", 1)])
    with pytest.raises(KeyError, match="no stage 'b'"):
        history.steps("b")
    with pytest.raises(ValueError, match="unknown metric 'slope'"):
        history.metric("a", "slope")
    with pytest.raises(ValueError, match="stage 'a' has no parameter 'bias'"):
        history.metric("a", "lipschitz", "bias")


def test_state_is_checked_and_converted():
    history = SmoothnessHistory()
    history.append(1, [measure("a", 1)])
    state = history.state_dict()
    state["a"]["metrics"] = {k: v.double() for k, v in state["a"]["metrics"].items()}
    loaded = SmoothnessHistory.from_state_dict(state)
    assert {v.dtype for v in loaded.state_dict()["a"]["metrics"].values()} == {torch.float32}
    for bad, message in [
        ({"a": {**state["a"], "parameters": "all"}}, "'parameters' is a list of str"),
        ({"a": {**state["a"], "extra": 1}}, r"unexpected: \['extra'\]"),
        ({"a": {**state["a"], "depth_profile": torch.zeros(1, 3, 1)}}, "floating-point 2-d"),
        ({"a": {**state["a"], "step": [1]}}, "'step' is an integer 1-d tensor, got list"),
        ({"a": {**state["a"], "depth": torch.tensor([1])}}, "'depth' holds 1 block counts >= 2"),
        ({"a": {**state["a"], "metrics": {"x": torch.zeros(1)}}}, "'x' is a floating-point 2-d"),
        ({"a": {**state["a"], "metrics": {1: torch.zeros(1, 2)}}}, "a dict of metric names"),
        ({1: state["a"]}, "stage names are str"),
    ]:
        with pytest.raises(ValueError, match=message):
            SmoothnessHistory.from_state_dict(bad)


def test_two_block_stages_and_single_steps_are_drawn(tmp_path):
    history = SmoothnessHistory()
    history.append(5, [measure("layer4", 1.0, depth=2), measure("layer3", 2.0, depth=6)])
    figure = smoothness_figure(history)
    heatmaps = [axes for axes in figure.axes if axes.get_title().endswith("slope in depth")]
    for axes, rows in zip(heatmaps, (1, 5), strict=True):
        (mesh,) = axes.collections
        x, y = mesh.get_coordinates()[..., 0], mesh.get_coordinates()[..., 1]
        assert mesh.get_array().shape == (rows, 1)
        assert x.max() - x.min() == pytest.approx(1.0)
        assert y.max() - y.min() == pytest.approx(rows)
    path = plot_smoothness(history, tmp_path / "s.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plots_read_a_plain_state_dict_and_check_it(tmp_path):
    history = SmoothnessHistory()
    history.append(1, [measure("a", math.nan)])
    history.append(2, [measure("a", 1.0)])
    assert plot_smoothness(history.state_dict(), tmp_path / "s.png").is_file()
    with pytest.raises(ValueError, match=r"stage 'a': 'metrics' 'lipschitz' has shape \(2, 2\)"):
        plot_smoothness(
            {"a": {**history.state_dict()["a"], "metrics": {"lipschitz": torch.zeros(2, 1)}}},
            "x.png",
        )


def test_non_finite_weights_are_reported_once_and_scalars_are_keyed_as_logged():
    history = SmoothnessHistory()
    for step in (1, 2):
        history.append(
            step, [measure("a", 1.0)._replace(table=torch.tensor([[1.0] * 5, [math.inf] * 5]))]
        )
    drained = history.drain()
    assert drained.non_finite == [("a", "conv.weight", 1)]
    history.append(3, [measure("a", math.nan)])
    assert history.drain().non_finite == []
    scalars = measure("a", 2.0).scalars("smoothness")
    assert scalars["smoothness/a/lipschitz"] == 2.0
    assert scalars["smoothness/a/conv.weight/curvature"] == 2.0
    assert len(scalars) == 2 * len(METRICS)
    assert list(measure("a", 2.0).scalars("s", per_parameter=False)) == [
        f"s/a/{m}" for m in METRICS
    ]


def test_metrics_are_kept_by_name_and_read_as_nan_where_not_measured():
    history = SmoothnessHistory()
    history.append(1, [measure("a", 1.0)])
    state = history.state_dict()
    del state["a"]["metrics"]["curvature"]  # a metric added after this state was written
    state["a"]["metrics"]["future"] = torch.full((1, 2), 7.0)  # one this version does not know
    resumed = SmoothnessHistory.from_state_dict(state)
    assert list(resumed.state_dict()["a"]["metrics"]) == [*METRICS, "future"]
    assert math.isnan(float(resumed.metric("a", "curvature")[0]))
    resumed.append(2, [measure("a", 2.0)])
    assert resumed.metric("a", "curvature").tolist() == pytest.approx([math.nan, 2.0], nan_ok=True)
    assert resumed.metric("a", "future", "conv.weight").tolist() == pytest.approx(
        [7.0, math.nan], nan_ok=True
    )
    assert resumed.metric("a", "weight_norm").tolist() == [1.0, 2.0]


def test_version_1_records_are_converted_with_depths_from_their_padding():
    nan = math.nan
    profile = torch.tensor([[1.0, 2.0, nan, nan], [1.0, 2.0, 3.0, 4.0], [nan, nan, nan, nan]])
    table = torch.arange(3 * 2 * 5, dtype=torch.float32).reshape(3, 2, 5)
    record = {
        "step": torch.tensor([1, 2, 3]),
        "parameters": [ALL, "w"],
        "metrics": table,
        "depth_profile": profile,
        "probe_step": torch.tensor([2]),
        "depth_consistency": torch.tensor([0.5]),
    }
    history = SmoothnessHistory.from_state_dict({"a": record})
    # the last row's weights were non-finite: its depth is the widest
    assert history.depth("a").tolist() == [3, 5, 5]
    order = ["weight_norm", "lipschitz", "total_variation", "relative_roughness", "curvature"]
    for column, metric in enumerate(order):
        assert torch.equal(history.metric("a", metric, "w"), table[:, 1, column])
    assert history.state_dict()["a"]["probe_step"].tolist() == [2]
    with pytest.raises(ValueError, match=r"'metrics' has shape \(3, 2, 5\), got \(3, 2, 4\)"):
        SmoothnessHistory.from_state_dict({"a": {**record, "metrics": table[..., :4]}})


def test_rows_of_different_depths_share_one_depth_axis_and_colour_scale():
    history = SmoothnessHistory()
    for step, depth in [(1, 3), (2, 3), (3, 5), (4, 5), (5, 2)]:
        history.append(step, [measure("a", float(step), depth=depth)])
    history.append(6, [measure("a", math.nan, depth=2)])
    figure = smoothness_figure(history)
    heatmap, curve = figure.axes[0], figure.axes[1]
    meshes = heatmap.collections
    assert [mesh.get_array().shape for mesh in meshes] == [(2, 2), (4, 2), (1, 2)]
    for mesh in meshes:
        y = mesh.get_coordinates()[..., 1]
        assert (y.min(), y.max()) == (0.5, 4.5)
    # the colours show the slope L ||θ_{k+1} - θ_k||: 3 x 1 up to 5 x 4, NaN left out
    assert {id(mesh.norm) for mesh in meshes} == {id(meshes[0].norm)}
    assert (meshes[0].norm.vmin, meshes[0].norm.vmax) == (3.0, 20.0)
    assert meshes[1].get_array()[0, 1] == 5 * 4.0
    assert heatmap.get_ylabel() == "k (of 5 blocks)"
    changes = [line.get_xdata()[0] for line in curve.lines if line.get_linestyle() == ":"]
    assert changes == [3.0, 5.0]
