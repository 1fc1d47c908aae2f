"""ode_resnet: exact Euler steps and the three initialisations."""

import pytest
import torch

from resode_lightning import find_stages, is_ode_form, ode_resnet
from resode_lightning.core.parameters import stage_parameters


def stage_lipschitz(model) -> float:
    """L · max_k ||θ_{k+1} - θ_k|| over all block parameters, by hand."""
    stage = find_stages(model)[0]
    blocks = stage.blocks
    vectors = [torch.cat([p.detach().flatten() for p in b.parameters()]) for b in blocks]
    return len(blocks) * max(float((b - a).norm()) for a, b in zip(vectors, vectors[1:]))


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm", [True, False])
def test_shapes_and_ode_form(stem, activation, norm):
    model = ode_resnet(
        depths=(2, 3),
        widths=(4, 8),
        num_classes=7,
        in_channels=1,
        stem=stem,
        activation=activation,
        norm=norm,
        init="iid",
    )
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert is_ode_form(model)
    assert [s.depth for s in find_stages(model)] == [2, 3]


def test_blocks_are_exact_euler_steps_by_hand():
    model = ode_resnet(
        depths=(4,), widths=(4,), horizon=2.0, init="smooth", activation="gelu"
    ).eval()
    x = torch.randn(2, 4, 8, 8)
    expected = x
    with torch.no_grad():
        for block in model.stages[0]:
            field = block.bn2(
                block.conv2(torch.nn.functional.gelu(block.bn1(block.conv1(expected))))
            )
            expected = expected + 0.5 * field  # h = horizon / L = 2 / 4
        torch.testing.assert_close(model.stages[0](x), expected)


def test_tied_init_copies_one_block_and_zeroes_each_branch():
    model = ode_resnet(depths=(6,), widths=(8,), init="tied", seed=3)
    blocks = model.stages[0]
    for block in blocks[1:]:
        for (name, a), b in zip(blocks[0].state_dict().items(), block.state_dict().values()):
            assert torch.equal(a, b), name
    assert (
        torch.count_nonzero(blocks[0].bn2.weight) == 0
        and torch.count_nonzero(blocks[0].bn2.bias) == 0
    )
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(blocks(x), x)  # every branch starts at 0


def test_tied_init_without_norm_zeroes_last_conv():
    model = ode_resnet(depths=(3,), widths=(4,), norm=False, init="tied")
    assert torch.count_nonzero(model.stages[0][2].conv2.weight) == 0
    assert torch.count_nonzero(model.stages[0][2].conv2.bias) == 0


def test_smooth_and_tied_lipschitz_do_not_grow_with_depth_iid_grows_linearly():
    lipschitz = {
        init: [
            stage_lipschitz(ode_resnet(depths=(depth,), widths=(8,), init=init, seed=1))
            for depth in (8, 32, 128)
        ]
        for init in ("tied", "smooth", "iid")
    }
    assert lipschitz["tied"] == [0.0, 0.0, 0.0]
    smooth = lipschitz["smooth"]
    assert max(smooth) / min(smooth) < 2.0  # bounded in L
    iid = lipschitz["iid"]
    assert 8 < iid[2] / iid[0] < 32  # ≈ 16 = 128 / 8: linear in L
    assert iid[0] > smooth[0] * 0.5


def test_smooth_init_weights_stay_at_default_scale():
    iid = stage_parameters(
        find_stages(ode_resnet(depths=(16,), widths=(8,), init="iid", seed=0))[0]
    )
    smooth = stage_parameters(
        find_stages(ode_resnet(depths=(16,), widths=(8,), init="smooth", seed=0))[0]
    )
    ratio = float(smooth["conv1.weight"].std() / iid["conv1.weight"].std())
    assert 0.6 < ratio < 1.5


def test_seed_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = ode_resnet(depths=(3,), widths=(4,), init="smooth", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ode_resnet(depths=(3,), widths=(4,), init="smooth", seed=7)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depths": (1, 4), "widths": (4, 8)}, "at least 2 blocks"),
        ({"depths": (4,), "widths": (4, 8)}, "equal length"),
        ({"init": "orthogonal"}, "init must be one of"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"stem": "mnist"}, "stem must be"),
        ({"horizon": 0.0}, "horizon must be positive"),
        ({"horizon": float("inf")}, "horizon must be positive and finite"),
    ],
)
def test_invalid_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ode_resnet(**kwargs)
