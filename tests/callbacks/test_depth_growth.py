"""DepthGrowth (issue 20): stages grown by interpolation in depth keep the network's function up
to the measured error, carry the optimizer state, resume mid-schedule exactly, grow in lock-step
under DDP, and end as an ordinary network of the built depth."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.boring import NestedBackboneModule, loader, quiet_trainer, random_images
from helpers.runif import RunIf
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock

from resode_lightning import ImageClassifier, ode_resnet, to_ode_form
from resode_lightning.callbacks import DepthGrowth, DepthSampling
from resode_lightning.core.growth import carry_optimizer_state, grow_depth
from resode_lightning.core.stages import find_stages
from resode_lightning.core.step import named_parameters_by_key

SIZE = 8
PROBE = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def smooth_net(depth: int = 4) -> nn.Module:
    """An ``ode_resnet`` whose blocks differ smoothly in depth (branches not zero)."""
    return ode_resnet(depths=(depth,), widths=(8,), init="smooth", seed=0).eval()


def basic_net(depth: int = 4, ode: bool = False) -> nn.Module:
    """torchvision ``BasicBlock``s (post-activation, plain form unless ``ode``), one stage."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Sequential(*[BasicBlock(8, 8) for _ in range(depth)]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )
        for block in net[1]:  # branches of size 1 / depth: the Euler steps of a field
            nn.init.uniform_(block.bn2.weight, 0.2 / depth, 0.6 / depth)
            nn.init.uniform_(block.bn2.bias, -0.1 / depth, 0.1 / depth)
    return to_ode_form(net, inplace=True).eval() if ode else net.eval()


NETS = {
    "ode_resnet": (smooth_net, "stages.0"),
    "torchvision plain": (basic_net, "1"),
    "torchvision ODE form": (lambda depth=4: basic_net(depth, ode=True), "1"),
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- core


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
@pytest.mark.parametrize("net", list(NETS))
def test_growth_changes_the_function_by_the_measured_error(net, interpolation):
    build, stage = NETS[net]
    model = build()
    coarse = copy.deepcopy(model)
    with torch.no_grad():
        before = coarse(PROBE)
        inputs = coarse[0](PROBE) if isinstance(coarse, nn.Sequential) else coarse.stem(PROBE)
        stage_before = (coarse[1] if isinstance(coarse, nn.Sequential) else coarse.stages[0])(
            inputs
        )
    change = grow_depth(model, {stage: 8}, interpolation=interpolation, probe=PROBE)
    assert change.depths == {stage: (4, 8)}
    assert [s.depth for s in find_stages(model)] == [8]
    assert find_stages(model)[0].is_ode_form == find_stages(coarse)[0].is_ode_form
    with torch.no_grad():
        after = model(PROBE)
        grown = model[1] if isinstance(model, nn.Sequential) else model.stages[0]
        stage_after = grown(inputs)
    # the error measured is the change of the function, to rounding
    assert change.output_error == pytest.approx(relative(after, before), rel=1e-4, abs=1e-7)
    assert change.errors[stage] == pytest.approx(relative(stage_after, stage_before), rel=1e-4)
    # it is the Euler scheme's error at the finer step: small, not zero
    assert 1e-6 < change.errors[stage] < 0.1


@pytest.mark.parametrize("net", list(NETS))
def test_constant_growth_keeps_the_weight_path_and_shrinking_back_is_exact(net):
    build, stage = NETS[net]
    model = build()
    original = copy.deepcopy(model)
    old = [dict(named_parameters_by_key(b)) for b in find_stages(model)[0].blocks]
    plain = not find_stages(model)[0].is_ode_form
    change = grow_depth(model, {stage: 8}, interpolation="constant")
    new = [dict(named_parameters_by_key(b)) for b in find_stages(model)[0].blocks]
    last = {t.name for t in change.tensors if t.scale != 1}
    assert last == ({"bn2.weight", "bn2.bias"} if plain else set())
    for j, params in enumerate(new):
        for name, value in params.items():
            factor = 0.5 if name in last else 1.0  # a plain last layer holds the step, halved
            assert torch.equal(value, old[j // 2][name] * factor), (j, name)
    grow_depth(model, {stage: 4}, interpolation="constant")
    for name, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(model(PROBE), original(PROBE))


@RunIf(timm=True)
@pytest.mark.parametrize("ode", [False, True])
def test_timm_blocks_grow_with_their_optimizer_state(ode):
    from timm.models.resnet import BasicBlock as TimmBlock
    from timm.models.resnet import ResNet as TimmResNet

    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = TimmResNet(TimmBlock, [4, 1, 1, 1], num_classes=10, channels=(8, 16, 32, 64))
        for block in model.layer1[1:]:  # timm zeroes the last BatchNorm: give it a field
            nn.init.uniform_(block.bn2.weight, 0.05, 0.15)
    model = to_ode_form(model, inplace=True) if ode else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _step(model, optimizer)
    model.eval()
    coarse = copy.deepcopy(model)
    change = grow_depth(model, {"layer1": 6}, interpolation="constant", probe=PROBE)
    carry_optimizer_state(optimizer, change)
    with torch.no_grad():
        measured = relative(model(PROBE), coarse(PROBE))
    assert change.depths == {"layer1": (3, 6)} and 0 < change.output_error < 0.1
    assert change.output_error == pytest.approx(measured, rel=1e-4)
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], model.parameters()))
    _step(model, optimizer)


def test_growth_error_falls_with_the_step():
    errors = [
        grow_depth(smooth_net(depth), {"stages.0": 2 * depth}, probe=PROBE).errors["stages.0"]
        for depth in (4, 8, 16)
    ]
    assert errors[0] > errors[1] > errors[2] > 0


def test_growth_refuses_bad_depths_and_leaves_the_model():
    model = smooth_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for depths, message in (
        ({"nope": 8}, "unknown stage"),
        ({"stages.0": 1}, "at least 2"),
        ({"stages.0": 8.0}, "must be an int"),
    ):
        with pytest.raises(ValueError, match=message):
            grow_depth(model, depths)
    with pytest.raises(ValueError, match="interpolation"):
        grow_depth(model, {"stages.0": 8}, interpolation="cubic")
    assert model.state_dict().keys() == state.keys()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(PROBE), torch.arange(4)).backward()
    optimizer.step()


@pytest.mark.parametrize("net", ["ode_resnet", "torchvision plain"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_is_carried(net, kind):
    build, stage = NETS[net]
    model = build()
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, optimizer)
    old = {
        name: [optimizer.state[b[name]] for b in map(named_parameters_by_key, blocks)]
        for blocks in [find_stages(model)[0].blocks]
        for name in named_parameters_by_key(blocks[0])
    }
    lr_group = optimizer.param_groups[0]
    change = grow_depth(model, {stage: 8}, interpolation="constant")
    carry_optimizer_state(optimizer, change)
    # one group, the same dict, the grown model's parameters in module order
    assert optimizer.param_groups[0] is lr_group
    assert all(a is b for a, b in zip(lr_group["params"], model.parameters(), strict=True))
    assert all(p not in optimizer.state for t in change.tensors for p in t.old)
    for tensor in change.tensors:
        g = tensor.gradient_scale
        assert g == (1.0 if tensor.scale != 1 else 0.5)
        for j, p in enumerate(tensor.new):
            state, source = optimizer.state[p], old[tensor.name][j // 2]
            if kind == "sgd":
                assert torch.equal(state["momentum_buffer"], source["momentum_buffer"] * g)
            else:
                assert torch.equal(state["exp_avg"], source["exp_avg"] * g)
                assert torch.equal(state["exp_avg_sq"], source["exp_avg_sq"] * g**2)
                assert torch.equal(state["step"], source["step"])
    # a fresh optimizer on the grown model reads the state as saved
    fresh = type(optimizer)(model.parameters(), **{"lr": 0.1})
    fresh.load_state_dict(optimizer.state_dict())
    _step(model, optimizer)


@pytest.mark.parametrize("net", ["ode_resnet", "torchvision plain"])
def test_gradients_follow_the_carried_scale(net):
    """The gradient of each block a coarse block becomes is about ``gradient_scale`` times the
    coarse block's: 1/2 in ODE form, 1 for a plain stage's last layer (it holds the halved
    step); about: to the Euler scheme's error, for branches of the size of the step."""
    build, stage = NETS[net]
    model = build(8).train()
    coarse = copy.deepcopy(model)
    change = grow_depth(model, {stage: 16}, interpolation="constant")
    for module in (model, coarse):
        nn.functional.cross_entropy(module(PROBE), torch.arange(4)).backward()
    old_blocks, new_blocks = find_stages(coarse)[0].blocks, find_stages(model)[0].blocks
    for tensor in change.tensors:
        old = torch.stack([named_parameters_by_key(b)[tensor.name].grad for b in old_blocks])
        new = torch.stack([named_parameters_by_key(b)[tensor.name].grad for b in new_blocks])
        fitted = float((new[0::2] * old).sum() / old.square().sum())  # least squares
        assert fitted == pytest.approx(tensor.gradient_scale, rel=0.1), tensor.name


def test_optimizer_refuses_split_groups_and_unknown_state():
    model = smooth_net()
    blocks = list(model.stages[0])
    first = list(blocks[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    optimizer = torch.optim.SGD([{"params": first}, {"params": rest}], lr=0.1, momentum=0.9)
    _step(model, optimizer)
    change = grow_depth(model, {"stages.0": 8})
    before = [list(g["params"]) for g in optimizer.param_groups]
    with pytest.raises(ValueError, match="different param groups"):
        carry_optimizer_state(optimizer, change)
    assert [list(g["params"]) for g in optimizer.param_groups] == before
    model = smooth_net()
    optimizer = torch.optim.Adagrad(model.parameters())
    _step(model, optimizer)
    with pytest.raises(ValueError, match="Adagrad"):
        carry_optimizer_state(optimizer, grow_depth(model, {"stages.0": 8}))


# ----------------------------------------------------------------------------- callback


class BasicModule(NestedBackboneModule):
    """A user's module: plain torchvision blocks, AdamW and a step-wise cosine schedule."""

    def __init__(self) -> None:
        super().__init__(basic_net(8).train())
        self.save_hyperparameters()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def classifier() -> ImageClassifier:
    """``ode_resnet`` (one stage of 8, tied) with SGD, momentum and a step-wise cosine."""
    kwargs = {"depths": [8], "widths": [8], "init": "tied", "seed": 0}
    return ImageClassifier("ode_resnet", kwargs, lr=0.1)


MODULES = {"ode_resnet": classifier, "torchvision plain": BasicModule}


def growth(**kwargs) -> DepthGrowth:
    return DepthGrowth((0.25, 0.5, 1.0), (1, 2), **kwargs)


def fit(tmp_path: Path, module, callbacks, *, data=None, ckpt_path=None, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(default_root_dir=tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(module, data or loader(16, SIZE), ckpt_path=ckpt_path)
    return trainer


def depth(module) -> int:
    return find_stages(module)[0].depth


def test_schedule_grows_at_its_epochs_and_logs_the_error(tmp_path):
    callback = growth()
    module = classifier()
    trainer = fit(tmp_path, module, [callback], max_epochs=3)
    assert depth(module) == 8
    assert [(r["epoch"], r["step"], r["depths"]) for r in callback.growths] == [
        (1, 4, {"backbone.stages.0": [2, 4]}),
        (2, 8, {"backbone.stages.0": [4, 8]}),
    ]
    assert all(0 <= r["errors"]["backbone.stages.0"] < 0.1 for r in callback.growths)
    assert "depth_growth/backbone.stages.0/error" in trainer.callback_metrics
    params = list(module.parameters())
    assert all(a is b for a, b in zip(trainer.optimizers[0].param_groups[0]["params"], params))


@RunIf(lightning=True)
def test_unified_lightning_trainer(tmp_path):
    import lightning.pytorch as lightning

    from resode_lightning.lit.lightning_pytorch import ImageClassifier as UnifiedClassifier

    kwargs = {"depths": [8], "widths": [8], "init": "tied", "seed": 0}
    module = UnifiedClassifier("ode_resnet", kwargs, lr=0.1)
    callback = growth()
    trainer = quiet_trainer(
        lightning, default_root_dir=tmp_path, max_epochs=3, callbacks=[callback]
    )
    trainer.fit(module, loader(16, SIZE))
    assert depth(module) == 8 and [r["epoch"] for r in callback.growths] == [1, 2]


class Record(pl.Callback):
    """The module's state after every optimizer step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.states[trainer.global_step] = state


def repeated_batches() -> DataLoader:
    """Four equal batches an epoch: a run resumed inside an epoch (whose loader starts again)
    sees the data the uninterrupted run saw."""
    x, y = random_images(4, SIZE)[:]
    return DataLoader(TensorDataset(x.repeat(4, 1, 1, 1), y.repeat(4)), batch_size=4)


@pytest.mark.parametrize("module", list(MODULES))
def test_resume_mid_schedule_equals_the_uninterrupted_run(tmp_path, module):
    """Checkpoints at the end of epoch 0 (before the first growth), inside epoch 1 and at its end
    (between growths): resumed, the next step gives the uninterrupted run's parameters, and so
    do the steps after it, through the next growth."""
    every_step = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    straight = Record()
    fit(
        tmp_path / "a",
        MODULES[module](),
        [growth(), every_step, straight],
        data=repeated_batches(),
        max_epochs=3,
        max_steps=9,
        enable_checkpointing=True,
    )
    for step in (4, 6, 8):
        resumed, callback = Record(), growth()
        path = tmp_path / "ckpt" / f"epoch={(step - 1) // 4}-step={step}.ckpt"
        trainer = fit(
            tmp_path / "b",
            MODULES[module](),
            [callback, resumed],
            data=repeated_batches(),
            max_epochs=3,
            max_steps=9,
            ckpt_path=path,
        )
        assert [(r["epoch"], r["step"]) for r in callback.growths] == [(1, 4), (2, 8)]
        assert trainer.global_step == 9 and min(resumed.states) == step + 1
        for done, state in resumed.states.items():
            for name, value in straight.states[done].items():
                assert torch.equal(state[name], value), (step, done, name)


@pytest.mark.parametrize("module", list(MODULES))
def test_final_checkpoint_loads_without_the_callback(tmp_path, module):
    trained = MODULES[module]()
    trainer = fit(tmp_path, trained, [growth()], max_epochs=3)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    loaded = type(trained).load_from_checkpoint(tmp_path / "final.ckpt").eval()  # strict
    assert [s.depth for s in find_stages(loaded)] == [8]
    with torch.no_grad():
        assert torch.equal(loaded(PROBE), trained.eval()(PROBE))


def test_trigger_grows_when_the_lipschitz_constant_settles(tmp_path):
    eager = DepthGrowth((0.25, 0.5, 1.0), (3, 4), trigger=0.99)
    patient = DepthGrowth((0.25, 0.5, 1.0), (3, 4), trigger=1e-9)
    fit(tmp_path, classifier(), [eager], max_epochs=5)
    fit(tmp_path, classifier(), [patient], max_epochs=5)
    # readings after an epoch at each depth: compared first at the start of its third epoch
    assert [r["epoch"] for r in eager.growths] == [2, 4]
    assert [r["epoch"] for r in patient.growths] == [3, 4]  # the schedule's epochs bound it


class AverageSnapshot(pl.Callback):
    """The averaged stage of an EMA callback at the first batch of every epoch."""

    def __init__(self, ema: EMAWeightAveraging) -> None:
        self.ema = ema
        self.stages: list[nn.Module] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            average = self.ema._average_model.module
            self.stages.append(copy.deepcopy(find_stages(average)[0].blocks))


def test_ema_weights_grow_with_the_module(tmp_path):
    ema = EMAWeightAveraging()
    before, after = AverageSnapshot(ema), AverageSnapshot(ema)
    module = classifier()
    fit(tmp_path, module, [ema, before, growth(), after], max_epochs=3)
    assert depth(ema._average_model.module) == depth(module) == 8
    # at each growth the averaged blocks are read off the averaged path, as the weights are
    for epoch in (1, 2):
        coarse, fine = before.stages[epoch], after.stages[epoch]
        assert len(fine) == 2 * len(coarse)
        for j, block in enumerate(fine):
            for (name, a), b in zip(
                block.state_dict().items(), coarse[j // 2].state_dict().values()
            ):
                assert torch.equal(a, b), (epoch, j, name)


class _RankState(DepthGrowth):
    """Saves each rank's parameters and growths: ddp_spawn sends no callback back."""

    def __init__(self, directory: str) -> None:
        super().__init__((0.25, 0.5, 1.0), (1, 2))
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        # parameters: BatchNorm statistics stay each rank's until DDP's next forward
        state = {k: v.detach().cpu() for k, v in pl_module.named_parameters()}
        wrapped = isinstance(trainer.strategy.model, DistributedDataParallel)
        record = {"state": state, "growths": self.growths, "wrapped": wrapped}
        torch.save(record, Path(self.directory) / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_grows_in_lock_step(tmp_path):
    trainer = quiet_trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[_RankState(str(tmp_path))],
    )
    trainer.fit(classifier(), loader(16, SIZE))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["growths"] == ranks[1]["growths"]
    assert [r["epoch"] for r in ranks[0]["growths"]] == [1, 2]
    assert ranks[0]["wrapped"] and ranks[1]["wrapped"]
    assert len([k for k in ranks[0]["state"] if k.endswith("conv1.weight")]) == 8
    # each rank saw other batches after the last growth: equal weights mean DDP reduced the new
    # parameters' gradients
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depths": (0.5,)}, "depths"),
        ({"depths": (0.5, 0.25, 1.0)}, "depths"),
        ({"depths": (0.25, 0.5)}, "depths"),
        ({"epochs": (1,)}, "epochs"),
        ({"epochs": (0, 2)}, "epochs"),
        ({"epochs": (1.5, 2)}, "epochs"),
        ({"trigger": 0.0}, "trigger"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"probe_samples": 0}, "probe_samples"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DepthGrowth(**{"depths": (0.25, 0.5, 1.0), "epochs": (1, 2), **kwargs})


class AdagradModule(BasicModule):
    def configure_optimizers(self):
        return torch.optim.Adagrad(self.parameters())


def test_schedule_past_max_epochs_and_foreign_state_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not before max_epochs"):
        fit(tmp_path, classifier(), [growth()], max_epochs=2)
    fit(tmp_path, classifier(), [growth()], fast_dev_run=True)  # a smoke test is no schedule
    with pytest.raises(ValueError, match="DepthSampling"):
        fit(tmp_path, classifier(), [growth(), DepthSampling()], max_epochs=3)
    with pytest.raises(ValueError, match="Adagrad"):
        fit(tmp_path, AdagradModule(), [growth()], max_epochs=3)
    callback = growth()
    fit(tmp_path, classifier(), [callback], max_epochs=3)
    state = callback.state_dict()
    with pytest.raises(ValueError, match="built with"):
        callback.load_state_dict({**state, "targets": [16]})
    with pytest.raises(ValueError, match="level"):
        callback.load_state_dict({**state, "level": 7})
    with pytest.raises(ValueError, match="holds"):
        callback.load_state_dict({"history": []})
