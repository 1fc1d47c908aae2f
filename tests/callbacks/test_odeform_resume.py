"""Resuming a plain-form checkpoint with ODEForm: the state converts as it loads, same outputs,
and the optimizer state is rescaled to the ODE parametrisation (or refused, with a way out)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torchvision.models as tvm
from helpers.boring import NestedBackboneModule, loader, quiet_trainer

from resode_lightning import ODEForm, is_ode_form, to_ode_form
from resode_lightning.core.odeform import convert_state_dict
from resode_lightning.core.optimizer_state import rescale_optimizer_state
from resode_lightning.core.stages import find_stages
from resode_lightning.core.step import named_parameters_by_key
from resode_lightning.lit.classifier import ImageClassifier

FIXED = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
HORIZON = 0.5
FACTOR = 2 / HORIZON  # resnet18's one stage, layer1, has L = 2 identity-skip blocks
RESCALED = {
    f"net.backbone.layer1.{block}.bn2.{name}" for block in (0, 1) for name in ("weight", "bias")
}
# the power of the gradient each state entry is a statistic of: divided by FACTOR ** order
ORDERS = {
    "sgd": {"momentum_buffer": 1},
    "adam": {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
}


class Module(NestedBackboneModule):
    """The boring module with an optimizer that keeps state (or one ODEForm cannot rescale)."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(tvm.resnet18(num_classes=10))
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3, amsgrad=True)
        return torch.optim.Adadelta(self.parameters())


class RecordAtStart(pl.Callback):
    """Eval outputs on a fixed batch at fit start, and the optimizer state at train start."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def on_fit_start(self, trainer, pl_module):
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.outputs.append(pl_module(FIXED))
        pl_module.train(was_training)

    def on_train_start(self, trainer, pl_module):
        state = trainer.optimizers[0].state
        self.state = {  # by state-dict name: the same in plain and ODE form
            name: {key: value.clone() for key, value in state[p].items()}
            for name, p in named_parameters_by_key(pl_module).items()
        }


def outputs(module: torch.nn.Module) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(FIXED)


def trainer(tmp_path, callbacks, max_steps: int) -> pl.Trainer:
    return quiet_trainer(default_root_dir=tmp_path, max_steps=max_steps, callbacks=callbacks)


def plain_checkpoint(tmp_path, module: pl.LightningModule):
    """Two steps without ODEForm; the checkpoint, its optimizer state by parameter name."""
    fit = trainer(tmp_path, [], max_steps=2)
    fit.fit(module, loader())
    path = tmp_path / "plain.ckpt"
    fit.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]["state"]
    names = [name for name, _ in module.named_parameters()]
    return path, {names[index]: state for index, state in saved.items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_plain_checkpoint_resumes_in_ode_form_with_its_outputs_and_rescaled_state(
    tmp_path, optimizer
):
    plain = Module(optimizer)
    path, saved = plain_checkpoint(tmp_path, plain)
    expected = outputs(plain)

    resumed, record = Module(optimizer), RecordAtStart()
    fit = trainer(tmp_path, [ODEForm(horizon=HORIZON), record], max_steps=3)
    fit.fit(resumed, loader(), ckpt_path=path)

    torch.testing.assert_close(record.outputs[0], expected, rtol=1e-5, atol=1e-6)
    assert is_ode_form(resumed) and find_stages(resumed)[0].horizon == HORIZON
    assert fit.global_step == 3
    assert set(record.state) == set(saved)
    for name, state in saved.items():
        assert set(record.state[name]) == set(ORDERS[optimizer])
        for key, value in state.items():
            factor = FACTOR ** -ORDERS[optimizer][key] if name in RESCALED else 1.0
            torch.testing.assert_close(record.state[name][key], value * factor, rtol=0, atol=0)
    # the restore hook left with the run: a plain state dict is refused again
    with pytest.raises(RuntimeError, match="ode_horizon"):
        resumed.load_state_dict(plain.state_dict())


def test_ode_form_checkpoint_keeps_its_optimizer_state(tmp_path):
    first = Module("sgd")
    trainer(tmp_path, [ODEForm(horizon=HORIZON)], max_steps=2).fit(first, loader())
    path = tmp_path / "ode.ckpt"
    first.trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]["state"]
    names = list(named_parameters_by_key(first))

    record = RecordAtStart()
    trainer(tmp_path, [ODEForm(horizon=HORIZON), record], max_steps=3).fit(
        Module("sgd"), loader(), ckpt_path=path
    )
    torch.testing.assert_close(record.outputs[0], outputs(first))
    for index, state in saved.items():
        torch.testing.assert_close(
            record.state[names[index]]["momentum_buffer"], state["momentum_buffer"]
        )


def test_module_adopting_the_plain_form_on_load_is_converted_with_its_state(tmp_path):
    # ImageClassifier.on_load_checkpoint returns the stages to the checkpoint's plain form;
    # ODEForm converts them again at fit start and rescales the restored momentum.
    def classifier():
        return ImageClassifier("resnet18", optimizer="sgd", schedule="constant", lr=0.01)

    plain = classifier()
    trainer(tmp_path, [], max_steps=2).fit(plain, loader())
    path = tmp_path / "plain.ckpt"
    plain.trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]["state"]
    names = [name for name, _ in plain.named_parameters()]

    resumed, record = classifier(), RecordAtStart()
    trainer(tmp_path, [ODEForm(horizon=HORIZON), record], max_steps=3).fit(
        resumed, loader(), ckpt_path=path
    )
    torch.testing.assert_close(record.outputs[0], outputs(plain), rtol=1e-5, atol=1e-6)
    assert is_ode_form(resumed)
    rescaled = {name.replace("net.backbone.", "backbone.") for name in RESCALED}
    for index, state in saved.items():
        factor = 1 / FACTOR if names[index] in rescaled else 1.0
        torch.testing.assert_close(
            record.state[names[index]]["momentum_buffer"],
            state["momentum_buffer"] * factor,
            rtol=0,
            atol=0,
        )


def test_optimizer_state_it_cannot_rescale_is_refused_with_the_way_out(tmp_path):
    path, _ = plain_checkpoint(tmp_path, Module("adadelta"))
    with pytest.raises(ValueError, match="Adadelta.*acc_delta.*Resume without the optimizer"):
        trainer(tmp_path, [ODEForm()], max_steps=3).fit(
            Module("adadelta"), loader(), ckpt_path=path
        )


def test_plain_checkpoint_validates_with_its_outputs(tmp_path):
    plain = Module("sgd")
    path, _ = plain_checkpoint(tmp_path, plain)
    expected = trainer(tmp_path, [], max_steps=0).validate(plain, loader())[0]["val_loss"]
    resumed = Module("sgd")
    validated = trainer(tmp_path, [ODEForm()], max_steps=0).validate(
        resumed, loader(), ckpt_path=path
    )
    assert is_ode_form(resumed)
    assert validated[0]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_convert_state_dict_converts_plain_stages_only():
    plain = tvm.resnet18(num_classes=10).eval()
    state = plain.state_dict()
    ode = to_ode_form(plain, horizon=HORIZON)
    converted = dict(state)
    factors = convert_state_dict(ode, converted)
    assert factors == {name.removeprefix("net.backbone."): FACTOR for name in RESCALED}
    torch.testing.assert_close(converted["layer1.0.bn2.weight"], state["layer1.0.bn2.weight"] * 4)
    assert float(converted["layer1.ode_horizon"]) == HORIZON
    ode.load_state_dict(converted)  # strict
    torch.testing.assert_close(outputs(ode), outputs(plain), rtol=1e-5, atol=1e-6)
    # an ODE-form state, and a state under a prefix missing its tensors, are left alone
    assert convert_state_dict(ode, ode.state_dict()) == {}
    assert convert_state_dict(ode, dict(state), prefix="model.") == {}


def test_rescale_optimizer_state_leaves_stateless_and_refuses_unknown_atomically():
    kept, rescaled = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adadelta([kept, rescaled])
    rescale_optimizer_state(optimizer, {rescaled: 4.0})  # no state yet: nothing to rescale
    (kept.sum() + rescaled.sum()).backward()
    optimizer.step()
    before = {key: value.clone() for key, value in optimizer.state[rescaled].items()}
    with pytest.raises(ValueError, match="Adadelta"):
        rescale_optimizer_state(optimizer, {rescaled: 4.0})
    for key, value in before.items():
        torch.testing.assert_close(optimizer.state[rescaled][key], value)
