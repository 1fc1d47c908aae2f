"""Saved neural ODE files are hostile until checked: config schema, declared sizes, buffers."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from resode_lightning import (
    CheckpointError,
    export_neural_ode,
    load_neural_ode,
    ode_resnet,
    save_neural_ode,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ode") / "model_ode.pt"
    save_neural_ode(export_neural_ode(ode_resnet(depths=(3,), widths=(4,), num_classes=3)), path)
    return path


def tampered(saved, tmp_path, change_config=None, change_state=None, name="bad.pt"):
    """A copy of the saved file with its config and/or weights changed (our own file: trusted)."""
    content = torch.load(saved, weights_only=True)
    if change_config is not None:
        config = json.loads(content["config"])
        result = change_config(config)
        content["config"] = result if isinstance(result, str) else json.dumps(config)
    if change_state is not None:
        change_state(content["state_dict"])
    path = tmp_path / name
    torch.save(content, path)
    return path


def refused(path, match):
    with pytest.raises(CheckpointError, match=match) as error:
        load_neural_ode(path)
    assert str(path) in str(error.value)
    assert "weights_only=False" not in str(error.value)


def _set(section, key, value):
    def change(config):
        config[section][key] = value

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: "{not json", "unreadable config"),
        (lambda c: "[1, 2]", "has format 'list'"),
        (lambda c: c.pop("export"), "expected format, source and export"),
        (_set("export", "colour", "red"), r"unknown export option\(s\) \['colour'\]"),
        (_set("export", "method", 7), "method must be one of"),
        (_set("export", "steps", 10**9), r"steps must be an int in \[1, 100,000\]"),
        (_set("source", "num_classes", 10**9), "source.num_classes must be an int"),
        (_set("source", "widths", [2**20]), "source.widths must be a non-empty list"),
        (_set("source", "depths", [20000]), "source.depths must be a non-empty list"),
        (_set("source", "depths", [512, 512, 512, 512, 512, 512, 512, 512, 512]), "one entry per"),
        (_set("source", "kind", "python"), "source.kind must be one of"),
        (_set("source", "horizons", {"stages.0.ode_horizon": -1}), "source.horizons must map"),
        (_set("source", "num_classes", 7), r"fc.weight \[7, 4\] declared, \[3, 4\] stored"),
        (_set("source", "widths", [8]), "declares an architecture its weights do not have"),
        (_set("source", "depths", [1024]), "declares an architecture its weights do not"),
        (_set("export", "compile", True), "compile=True, which a file cannot switch on"),
        (_set("export", "checkpoints", 10**12), r"checkpoints must be an int in \[1, 100,000\]"),
        (_set("export", "rtol", 1e-300), r"rtol must be in \[1e-12, 1\]"),
        (_set("export", "atol", float("inf")), r"atol must be in \[1e-12, 1\]"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_built(saved, tmp_path, change, match):
    path = tampered(saved, tmp_path, change_config=change)
    started = time.perf_counter()
    refused(path, match)
    assert time.perf_counter() - started < 10  # nothing of the declared size was built


def _buffer(suffix, value):
    def change(state):
        key = next(k for k in state if k.endswith(suffix))
        state[key] = value(state[key])

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_buffer("horizon", lambda t: torch.zeros_like(t)), "horizon is 0.0, not a positive"),
        (_buffer("horizon", lambda t: torch.full_like(t, -1.0)), "horizon is -1.0"),
        (_buffer("horizon", lambda t: torch.full_like(t, float("nan"))), "NaN or infinite"),
        (_buffer("path.times", lambda t: t.flip(0)), "are not increasing times"),
        (_buffer("conv1-weight", lambda t: t.fill_(float("inf"))), "NaN or infinite"),
    ],
)
def test_tampered_buffers_and_weights_are_refused(saved, tmp_path, change, match):
    refused(tampered(saved, tmp_path, change_state=change), match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda state: state.clear(), "missing fc.bias, fc.weight"),
        (lambda state: state.pop(next(k for k in state if "path" in k)), "missing "),
        (lambda state: state.update(extra=torch.zeros(1)), "unexpected extra"),
        (
            lambda state: state.update({k: v.long() for k, v in state.items() if "conv1" in k}),
            "declares an architecture its weights do not have",
        ),
    ],
)
def test_every_key_is_checked_both_ways_before_anything_is_built(saved, tmp_path, change, match):
    refused(tampered(saved, tmp_path, change_state=change), match)


def test_a_huge_declared_net_with_an_empty_state_allocates_nothing(saved, tmp_path):
    """4 x 1,024 blocks of width 4,096 (tens of GB) declared by a file holding no weights."""
    huge = {"depths": [1024] * 4, "widths": [4096] * 4}

    def declare(config):
        config["source"].update(huge)
        config["source"]["horizons"] = {}

    path = tampered(saved, tmp_path, change_config=declare, change_state=lambda s: s.clear())
    with pytest.raises(CheckpointError, match="declares an architecture|source.depths"):
        load_neural_ode(path)


def test_saving_refuses_non_finite_weights_and_keeps_the_previous_file(tmp_path):
    export = export_neural_ode(ode_resnet(depths=(3,), widths=(4,), num_classes=3))
    path = tmp_path / "ode.pt"
    save_neural_ode(export, path)
    before = path.read_bytes()
    with torch.no_grad():
        next(export.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values.*existing file was kept"):
        save_neural_ode(export, path)
    assert path.read_bytes() == before


def test_recursive_checkpoints_above_the_steps_are_clamped():
    export = export_neural_ode(
        ode_resnet(depths=(4,), widths=(4,)), gradient="recursive", checkpoints=10**5
    ).train()
    export(torch.randn(2, 3, 8, 8)).sum().backward()  # at most 4 states: no allocation storm


def test_fuzzed_neural_ode_files_load_or_give_a_named_error(saved, tmp_path):
    """1,000 mutations: byte flips, truncations, and tampered JSON values."""
    data = saved.read_bytes()
    content = torch.load(saved, weights_only=True)
    config = json.loads(content["config"])
    generator = random.Random(0)
    hostile_values = [None, -1, 0, 1e308, float("nan"), "x", [], {}, [10**9], True, 2**40]
    outcomes = {"loaded": 0, "refused": 0}
    started = time.perf_counter()
    for i in range(1000):
        path = tmp_path / f"fuzz{i % 10}.pt"
        if i % 2 == 0:
            mutated = bytearray(data)
            if i % 4 == 0:
                mutated = mutated[: generator.randrange(len(mutated))]
            else:
                for _ in range(generator.randint(1, 8)):
                    mutated[generator.randrange(len(mutated))] = generator.randrange(256)
            path.write_bytes(bytes(mutated))
        else:
            changed = json.loads(json.dumps(config))
            section = changed[generator.choice(["source", "export"])]
            section[generator.choice(sorted(section))] = generator.choice(hostile_values)
            torch.save({**content, "config": json.dumps(changed)}, path)
        try:
            load_neural_ode(path)
            outcomes["loaded"] += 1
        except (CheckpointError, ValueError) as error:
            assert str(path) in str(error), error
            assert "weights_only=False" not in str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 500
    assert time.perf_counter() - started < 60
