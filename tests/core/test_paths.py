"""Weight paths: interpolation and least-squares knot fitting against float64 references."""

import numpy as np
import pytest
import torch

from resode_lightning.core.paths import fit_knots, interpolate, knot_times


def test_knot_times_are_left_ends_of_steps():
    torch.testing.assert_close(
        knot_times(4, 2.0), torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64)
    )


def test_linear_interpolation_matches_numpy():
    times = knot_times(5)
    values = torch.randn(5, 3, dtype=torch.float64)
    t = torch.linspace(0, 1, 23, dtype=torch.float64)
    result = interpolate(values, times, t, "linear")
    for column in range(3):
        expected = np.interp(t.numpy(), times.numpy(), values[:, column].numpy())
        np.testing.assert_allclose(result[:, column].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_constant_interpolation_takes_the_block_of_the_step_even_with_rounding():
    times = knot_times(4)
    values = torch.arange(4.0)[:, None]
    t = torch.tensor([0.0, 0.25 - 1e-12, 0.25, 0.49, 0.75, 0.99, 1.0], dtype=torch.float64)
    assert interpolate(values, times, t, "constant").flatten().tolist() == [0, 1, 1, 1, 3, 3, 3]


def test_scalar_time_gives_one_value():
    values = torch.randn(3, 2, 2)
    out = interpolate(values, knot_times(3).float(), torch.tensor(1 / 6), "linear")
    torch.testing.assert_close(out, 0.5 * (values[0] + values[1]))


def test_fit_knots_is_exact_at_full_depth_and_least_squares_below():
    times = knot_times(8)
    values = torch.randn(8, 4, dtype=torch.float64)
    knots, knot_t = fit_knots(values, times, 8)
    torch.testing.assert_close(knots, values)
    # a path linear in t is represented exactly by any number of knots
    linear = 3.0 + 2.0 * times[:, None] * torch.ones(1, 4, dtype=torch.float64)
    knots, knot_t = fit_knots(linear, times, 2)
    torch.testing.assert_close(interpolate(knots, knot_t, times), linear)
    # and the general fit solves the normal equations of the hat basis
    knots, knot_t = fit_knots(values, times, 3)
    basis = np.stack([np.interp(times.numpy(), knot_t.numpy(), np.eye(3)[j]) for j in range(3)], 1)
    expected, *_ = np.linalg.lstsq(basis, values.numpy(), rcond=None)
    np.testing.assert_allclose(knots.numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("count", [1, 9])
def test_fit_knots_rejects_impossible_counts(count):
    with pytest.raises(ValueError, match="knots must be between 2 and the stage depth 8"):
        fit_knots(torch.zeros(8, 2), knot_times(8), count)


def test_interpolation_mode_is_checked():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        interpolate(torch.zeros(2, 1), knot_times(2), 0.1, "cubic")


def test_interpolation_never_reads_the_time_on_the_host():
    """A vector field evaluates the path at every solver step: no device-to-host sync there."""
    from torch.profiler import ProfilerActivity, profile

    values, times = torch.randn(8, 3, 3), knot_times(8).float()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for mode in ("linear", "constant"):
            interpolate(values, times, torch.tensor(0.3), mode)
    syncs = [e for e in profiler.events() if e.name == "aten::_local_scalar_dense"]
    assert syncs == []
