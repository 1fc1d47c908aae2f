"""Checkpoints of an ODEForm run reload into the user's plain module (issue 18): strictly, with
``strict=False`` too, and resume with ODEForm exactly; old ODE-form checkpoints still resume and
refuse a strict plain load."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torchvision.models as tvm
from helpers.boring import NestedBackboneModule, loader, quiet_trainer

from resode_lightning import ODEForm, is_ode_form, load_into, load_state_dict_file, to_ode_form
from resode_lightning.core.odeform import convert_state_dict, unconvert_state_dict
from resode_lightning.core.stages import find_stages
from resode_lightning.core.step import named_parameters_by_key
from resode_lightning.lit.classifier import ImageClassifier

FIXED = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
MARKER = "net.backbone.layer1.ode_horizon"
HORIZON = 0.5  # layer1 holds L = 3 identity-skip blocks: factor L / horizon = 6, not exact


def backbone() -> torch.nn.Module:
    """A small torchvision ResNet whose one stage (layer1, 3 blocks) rescales by 3 / horizon,
    always initialised the same."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tvm.resnet.ResNet(tvm.resnet.BasicBlock, [3, 1, 1, 1], num_classes=10)


class UserModule(NestedBackboneModule):
    """A user's module: its constructor builds the plain network; SGD with momentum or Adam."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(backbone())
        self.save_hyperparameters()

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class OdeUserModule(NestedBackboneModule):
    """A user's module whose constructor builds the network in ODE form."""

    def __init__(self) -> None:
        super().__init__(to_ode_form(backbone(), horizon=HORIZON, inplace=True))


def data():
    return loader(count=4, batch_size=4)  # one batch: every step sees the same data


def fit(tmp_path, module, max_steps, callbacks=(), **kwargs):
    trainer = quiet_trainer(
        default_root_dir=tmp_path, max_steps=max_steps, callbacks=list(callbacks)
    )
    trainer.fit(module, data(), **kwargs)
    return trainer


def outputs(module):
    module.eval()
    with torch.no_grad():
        return module(FIXED)


def parameters(module):
    return {name: p.detach().clone() for name, p in named_parameters_by_key(module).items()}


def optimizer_state(trainer):
    optimizer = trainer.optimizers[0]
    names = {p: n for n, p in named_parameters_by_key(trainer.lightning_module).items()}
    return {names[p]: dict(state) for p, state in optimizer.state.items()}


def assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def ode_run(tmp_path, steps=2, optimizer="sgd"):
    module = UserModule(optimizer)
    trainer = fit(tmp_path, module, steps, [ODEForm(horizon=HORIZON)])
    path = tmp_path / "ode_run.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_checkpoint_holds_plain_weights_and_the_form_in_the_callback_state(tmp_path):
    module, path = ode_run(tmp_path)
    assert is_ode_form(module)
    checkpoint = torch.load(path, weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if "ode_horizon" in key]
    state = checkpoint["callbacks"]["ODEForm"]
    assert state["version"] == 1 and state["horizons"] == {MARKER: HORIZON}
    # the weights are those of the plain model computing the same function
    plain = UserModule()
    plain.load_state_dict(checkpoint["state_dict"])  # strict
    torch.testing.assert_close(outputs(plain), outputs(module), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strict", [True, False])
def test_plain_load_from_checkpoint_gives_the_trained_function(tmp_path, strict, recwarn):
    module, path = ode_run(tmp_path)
    loaded = UserModule.load_from_checkpoint(path, strict=strict)
    assert not is_ode_form(loaded.net["backbone"])
    torch.testing.assert_close(outputs(loaded), outputs(module), rtol=1e-5, atol=1e-6)
    assert not [w for w in recwarn if "not in the model state dict" in str(w.message)]


def test_plain_load_of_a_model_checkpoint_file(tmp_path):
    module = UserModule()
    every_step = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    trainer = quiet_trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        callbacks=[ODEForm(horizon=HORIZON), every_step],
        enable_checkpointing=True,
    )
    trainer.fit(module, data())
    loaded = UserModule.load_from_checkpoint(every_step.best_model_path)
    torch.testing.assert_close(outputs(loaded), outputs(module), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("resume_horizon", [HORIZON, 2.0])
def test_resume_continues_the_uninterrupted_run_exactly(tmp_path, optimizer, resume_horizon):
    uninterrupted = UserModule(optimizer)
    straight = fit(tmp_path / "a", uninterrupted, 3, [ODEForm(horizon=HORIZON)])

    _, path = ode_run(tmp_path / "b", steps=2, optimizer=optimizer)
    resumed = UserModule(optimizer)
    # the recorded horizon wins over the resuming callback's, as for an ODE-form checkpoint
    again = fit(tmp_path / "c", resumed, 3, [ODEForm(horizon=resume_horizon)], ckpt_path=path)
    assert again.global_step == 3
    assert find_stages(resumed)[0].horizon == HORIZON
    assert_same(parameters(resumed), parameters(uninterrupted))
    for name, state in optimizer_state(straight).items():
        assert_same(optimizer_state(again)[name], state)
    # and its own checkpoints are plain again
    again.save_checkpoint(tmp_path / "again.ckpt")
    loaded = UserModule.load_from_checkpoint(tmp_path / "again.ckpt", optimizer=optimizer)
    torch.testing.assert_close(outputs(loaded), outputs(uninterrupted), rtol=1e-5, atol=1e-6)


def test_validate_from_the_checkpoint_uses_the_trained_function(tmp_path):
    module, path = ode_run(tmp_path)
    expected = quiet_trainer().validate(module, data())[0]["val_loss"]
    fresh = UserModule()
    got = quiet_trainer(callbacks=[ODEForm()]).validate(fresh, data(), ckpt_path=path)
    assert is_ode_form(fresh) and find_stages(fresh)[0].horizon == HORIZON
    assert got[0]["val_loss"] == pytest.approx(expected, rel=1e-5)


def old_style(tmp_path, module, path):
    """What ODEForm wrote before issue 18: the ODE-form state dict, markers, no ODEForm state."""
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"] = module.state_dict()
    del checkpoint["callbacks"]["ODEForm"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    return old


def test_old_ode_form_checkpoint_resumes_and_refuses_a_strict_plain_load(tmp_path):
    uninterrupted = UserModule()
    fit(tmp_path / "a", uninterrupted, 3, [ODEForm(horizon=HORIZON)])
    module, path = ode_run(tmp_path / "b")
    old = old_style(tmp_path, module, path)
    assert MARKER in torch.load(old, weights_only=True)["state_dict"]

    resumed = UserModule()
    fit(tmp_path / "c", resumed, 3, [ODEForm(horizon=HORIZON)], ckpt_path=old)
    assert_same(parameters(resumed), parameters(uninterrupted))

    with pytest.raises(RuntimeError, match="Unexpected key.*ode_horizon"):
        UserModule.load_from_checkpoint(old)
    # the ways out: adopt the form with load_into, or put the state dict in the plain form
    adopted = load_into(UserModule(), load_state_dict_file(old))
    torch.testing.assert_close(outputs(adopted), outputs(module), rtol=1e-5, atol=1e-6)
    checkpoint = torch.load(old, weights_only=True)
    plain = UserModule()
    unconvert_state_dict(plain, checkpoint["state_dict"])
    plain.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(outputs(plain), outputs(module), rtol=1e-5, atol=1e-6)


def test_module_built_in_ode_form_keeps_its_markers(tmp_path):
    module = OdeUserModule()
    trainer = fit(tmp_path, module, 2, [ODEForm(horizon=1.0)])
    trainer.save_checkpoint(tmp_path / "ode.ckpt")
    checkpoint = torch.load(tmp_path / "ode.ckpt", weights_only=True)
    assert float(checkpoint["state_dict"][MARKER]) == HORIZON
    assert "ODEForm" not in checkpoint.get("callbacks", {})
    loaded = OdeUserModule.load_from_checkpoint(tmp_path / "ode.ckpt")
    torch.testing.assert_close(outputs(loaded), outputs(module), rtol=1e-5, atol=1e-6)


def test_second_fit_on_the_module_still_writes_plain_checkpoints(tmp_path):
    module = UserModule()
    fit(tmp_path, module, 1, [ODEForm(horizon=HORIZON)])
    trainer = fit(tmp_path, module, 2, [ODEForm(horizon=HORIZON)])
    trainer.save_checkpoint(tmp_path / "second.ckpt")
    loaded = UserModule.load_from_checkpoint(tmp_path / "second.ckpt")
    torch.testing.assert_close(outputs(loaded), outputs(module), rtol=1e-5, atol=1e-6)


def test_weights_only_checkpoints_are_warned_about(tmp_path):
    weights_only = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    with pytest.warns(UserWarning, match="save_weights_only"):
        quiet_trainer(
            max_steps=0, callbacks=[ODEForm(), weights_only], enable_checkpointing=True
        ).fit(UserModule(), data())


def test_state_of_another_version_is_refused(tmp_path):
    _, path = ode_run(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"]["ODEForm"]["version"] = 99
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="version 99"):
        fit(tmp_path, UserModule(), 3, [ODEForm()], ckpt_path=path)


def test_unconvert_state_dict_inverts_convert_state_dict():
    plain = backbone().eval()
    state = plain.state_dict()
    ode = to_ode_form(plain, horizon=HORIZON)
    ode_state = ode.state_dict()
    factors = unconvert_state_dict(plain, ode_state)
    assert factors == {f"layer1.{i}.bn2.{n}": 6.0 for i in range(3) for n in ("weight", "bias")}
    assert "layer1.ode_horizon" not in ode_state
    for key, value in state.items():
        torch.testing.assert_close(ode_state[key], value, rtol=1e-6, atol=0)
    assert convert_state_dict(ode, ode_state) == factors  # and back
    assert unconvert_state_dict(plain, dict(state)) == {}  # nothing marked: left alone
    assert unconvert_state_dict(ode, ode.state_dict(), markers=set()) == {}
    bad = ode.state_dict()
    bad["layer1.ode_horizon"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="layer1.ode_horizon"):
        unconvert_state_dict(plain, bad)


def test_module_adopting_the_plain_form_on_load_resumes_exactly(tmp_path):
    # ImageClassifier.on_load_checkpoint returns its stages to the checkpoint's (plain) form;
    # ODEForm puts them back in the recorded ODE form, its optimizer state kept as saved.
    def classifier():
        torch.manual_seed(0)
        return ImageClassifier("resnet18", optimizer="sgd", schedule="constant", lr=0.01)

    uninterrupted = classifier()
    fit(tmp_path / "a", uninterrupted, 3, [ODEForm(horizon=HORIZON)])
    first = classifier()
    fit(tmp_path / "b", first, 2, [ODEForm(horizon=HORIZON)]).save_checkpoint(tmp_path / "x.ckpt")
    resumed = classifier()
    fit(tmp_path / "c", resumed, 3, [ODEForm()], ckpt_path=tmp_path / "x.ckpt")
    assert find_stages(resumed.backbone)[0].horizon == HORIZON
    assert_same(parameters(resumed), parameters(uninterrupted))
