"""Export options: one validated object, its groups, and the flat view that the file, the CLI,
keywords and the callback derive from."""

from __future__ import annotations

import argparse
import types
import typing
import warnings
from collections.abc import Mapping

import pytest
from jsonargparse import ArgumentParser

from resode_lightning import NeuralODEExport
from resode_lightning.cli.export import add_option_arguments, options_from, text_type
from resode_lightning.core.paths import INTERPOLATIONS
from resode_lightning.export.options import (
    Adjoint,
    Backprop,
    Checkpointed,
    ExportOptions,
    PiecewiseConstant,
    PiecewiseLinear,
    RecursiveCheckpointed,
    flat_options,
)
from resode_lightning.export.solve import GRADIENTS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "rk5"}, "method must be one of"),
        ({"gradient": "magic"}, "gradient must be one of"),
        ({"gradient": 3}, "gradient must be one of .* or a Backprop, Checkpointed"),
        ({"interpolation": "cubic"}, "interpolation must be one of"),
        ({"interpolation": Adjoint()}, "interpolation must be one of"),
        ({"method": "dopri5", "steps": 4}, "steps=4 is for fixed-grid methods"),
        ({"steps": 0}, r"steps must be an int in \[1, 100,000\]"),
        ({"steps": {"layer1": 0}}, r"steps\['layer1'\] must be an int in"),
        ({"rtol": 0}, r"rtol must be in \[1e-12, 1\]"),
        ({"gradient": "recursive", "method": "dopri5"}, "gradient='recursive' needs a method"),
        ({"gradient": "recursive", "method": "implicit_adams"}, "needs a method of"),
        ({"fold_bn": "yes"}, "fold_bn must be a bool"),
    ],
)
def test_invalid_options_are_refused_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        ExportOptions(**changes)
    with pytest.raises(ValueError, match=message):
        NeuralODEExport("x.pt", **changes)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PiecewiseLinear(knots=1), "knots must be an int >= 2"),
        (lambda: PiecewiseLinear(knots=2.0), "knots must be an int >= 2"),
        (lambda: RecursiveCheckpointed(checkpoints=0), r"checkpoints must be an int in \[1, 100"),
        (lambda: RecursiveCheckpointed(checkpoints=True), "checkpoints must be an int"),
    ],
)
def test_a_group_refuses_its_own_invalid_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_groups_are_frozen_values():
    group = RecursiveCheckpointed(checkpoints=3)
    with pytest.raises(AttributeError, match="frozen"):
        group.checkpoints = 4
    assert group == RecursiveCheckpointed(3) != RecursiveCheckpointed(4)
    assert hash(group) == hash(RecursiveCheckpointed(3))
    assert repr(group) == "RecursiveCheckpointed(checkpoints=3)"
    assert Backprop() != Checkpointed()
    options = ExportOptions()
    with pytest.raises(AttributeError):
        options.gradient = Backprop()


def test_a_name_stands_for_its_group_with_defaults():
    by_name = ExportOptions(method="rk4", gradient="recursive", interpolation="constant")
    assert by_name.gradient == RecursiveCheckpointed()
    assert by_name.interpolation == PiecewiseConstant()
    assert by_name == ExportOptions(
        method="rk4", gradient=RecursiveCheckpointed(), interpolation=PiecewiseConstant()
    )
    assert ExportOptions().gradient == Checkpointed()
    assert ExportOptions().interpolation == PiecewiseLinear()


def test_the_group_names_are_the_solver_and_path_names():
    """Each mode the stage runs and each interpolation the path takes has exactly one group."""
    groups = {option.name: option.choices for option in flat_options()}
    assert sorted(groups["gradient"]) == sorted(GRADIENTS)
    assert sorted(groups["interpolation"]) == sorted(INTERPOLATIONS)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"checkpoints": 3}, "checkpoints=3 is an argument of gradient='recursive', not of "
         "gradient='checkpoint': give gradient='recursive' with it, or "
         r"gradient=RecursiveCheckpointed\(checkpoints=3\)"),
        ({"knots": 3, "interpolation": "constant"}, "knots=3 is an argument of "
         r"interpolation='linear', not of interpolation='constant'.*PiecewiseLinear\(knots=3\)"),
        ({"gradient": "checkpoint", "checkpoints": 10**12}, r"checkpoints must be an int in \[1"),
        ({"knots": 1}, "knots must be an int >= 2"),
        ({"gradient": RecursiveCheckpointed(2), "checkpoints": 3}, "checkpoints is given twice"),
        ({"colour": "red"}, r"unknown export option\(s\) \['colour'\]"),
    ],
)  # fmt: skip
def test_flat_names_are_checked_against_their_group(changes, message):
    with pytest.raises(ValueError, match=message):
        ExportOptions().replace(**changes)
    with pytest.raises(ValueError, match=message):
        NeuralODEExport("x.pt", **changes)
    if all(isinstance(value, (str, int)) for value in changes.values()):  # as in a file
        with pytest.raises(ValueError, match=message):
            ExportOptions.from_config({**ExportOptions().to_config(), **changes})


def test_keywords_by_flat_name_give_the_grouped_options():
    grouped = ExportOptions(
        method="rk4", gradient=RecursiveCheckpointed(3), interpolation=PiecewiseLinear(2)
    )
    flat = ExportOptions().replace(method="rk4", gradient="recursive", checkpoints=3, knots=2)
    assert flat == grouped
    assert NeuralODEExport("x.pt", method="rk4", gradient="recursive", checkpoints=3, knots=2)
    assert NeuralODEExport("x.pt", options=grouped).options == grouped
    # an argument alone changes the group in place; a group given anew starts from its defaults
    assert grouped.replace(checkpoints=5).gradient == RecursiveCheckpointed(5)
    assert grouped.replace(gradient="recursive").gradient == RecursiveCheckpointed()
    assert grouped.replace(gradient="backprop").gradient == Backprop()
    assert grouped.replace(interpolation="constant").interpolation == PiecewiseConstant()
    assert grouped.replace(gradient=RecursiveCheckpointed(7)).gradient.checkpoints == 7


def test_config_round_trip_is_flat_as_in_files_of_format_3():
    options = ExportOptions(
        method="rk4",
        steps={"layer3": 3},
        gradient=RecursiveCheckpointed(checkpoints=3),
        interpolation=PiecewiseLinear(knots=4),
    )
    config = options.to_config()
    assert config == {
        "method": "rk4",
        "steps": {"layer3": 3},
        "interpolation": "linear",
        "knots": 4,
        "gradient": "recursive",
        "checkpoints": 3,
        "fold_bn": True,
        "rtol": 1e-5,
        "atol": 1e-6,
        "compile": False,
    }
    assert ExportOptions.from_config(config) == options
    # a format-3 file written before the groups: every name, None where not given
    written = {**config, "gradient": "adjoint", "checkpoints": None, "knots": None}
    assert ExportOptions.from_config(written).gradient == Adjoint()
    assert ExportOptions.from_config({"method": "midpoint"}) == ExportOptions(method="midpoint")
    with pytest.raises(ValueError, match="must be a mapping"):
        ExportOptions.from_config([("method", "rk4")])
    with pytest.raises(ValueError, match="gradient must be one of"):
        ExportOptions.from_config({"gradient": ["recursive"]})


SAMPLES: dict[str, tuple[list[str], object]] = {
    "method": (["--method", "heun3"], "heun3"),
    "steps": (["--steps", "0.5"], 0.5),
    "interpolation": (["--interpolation", "linear"], "linear"),
    "knots": (["--knots", "3"], 3),
    "gradient": (["--gradient", "recursive"], "recursive"),
    "checkpoints": (["--checkpoints", "4"], 4),
    "fold_bn": (["--no-fold-bn"], False),
    "rtol": (["--rtol", "1e-4"], 1e-4),
    "atol": (["--atol", "1"], 1.0),
    "compile": (["--compile"], True),
}
"""Command-line text for every flat option and the value it must parse to (type included)."""


def conforms(value: object, hint: object) -> bool:
    """Whether ``value`` is of the type ``hint`` (unions, ``None``, mappings, plain classes)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is not None:
        return isinstance(value, typing.get_origin(hint))
    if hint is float:
        return type(value) is float
    return type(value) is hint


def test_every_option_is_a_cli_argument_parsed_to_its_real_type():
    assert sorted(SAMPLES) == sorted(option.name for option in flat_options())
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    assert options_from(parser.parse_args([])) == ExportOptions()
    for option in flat_options():
        argv, expected = SAMPLES[option.name]
        value = getattr(parser.parse_args(argv), option.name)
        assert value == expected and type(value) is type(expected), option.name
        assert conforms(value, option.type), (option.name, value, option.type)
        if option.group is not None:  # a group's argument: None (the group's default) parses
            assert getattr(parser.parse_args([argv[0], "none"]), option.name) is None
    args = parser.parse_args([token for argv, _ in SAMPLES.values() for token in argv])
    assert options_from(args) == ExportOptions(
        method="heun3",
        steps=0.5,
        interpolation=PiecewiseLinear(knots=3),
        gradient=RecursiveCheckpointed(checkpoints=4),
        fold_bn=False,
        rtol=1e-4,
        atol=1.0,
        compile=True,
    )


def test_cli_errors_name_the_argument(capsys):
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--knots", "2.5"])
    assert "argument --knots: invalid int or None value: '2.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--rtol", "tiny"])
    assert "argument --rtol: invalid float value: 'tiny'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="checkpoints=3 is an argument of gradient='recursive'"):
        options_from(parser.parse_args(["--checkpoints", "3"]))


def test_text_types_come_from_real_types_never_annotation_text():
    assert text_type(float | None)("0.5") == 0.5
    assert text_type(float | None)("None") is None
    assert text_type(typing.Optional[int])("7") == 7  # noqa: UP045 - the older spelling
    assert text_type(str)("rk4") == "rk4"
    for unreadable in (bool, bool | None, int | float, Mapping[str, int], "float"):
        with pytest.raises(TypeError, match="no command-line reading"):
            text_type(unreadable)


def test_a_lightning_config_gives_groups_by_name_or_class_path():
    """``NeuralODEExport`` in a LightningCLI YAML: jsonargparse reads the same types."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(NeuralODEExport, "export")

    def options(config: str) -> ExportOptions:
        parsed = parser.parse_args(["--export", '{"path": "x.pt", "options": ' + config + "}"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every value, defaults included, is written back
            saved = parser.dump(parsed)  # as LightningCLI saves a run's config.yaml
        again = parser.instantiate(parser.parse_string(saved)).export.options
        assert again == parser.instantiate(parsed).export.options
        return again

    assert options('{"method": "rk4"}') == ExportOptions(method="rk4")
    assert options('{"method": "rk4", "gradient": "adjoint"}') == ExportOptions(
        method="rk4", gradient=Adjoint()
    )
    path = "resode_lightning.export.options"
    assert options(
        '{"method": "rk4", "gradient": {"class_path": "' + path + '.RecursiveCheckpointed", '
        '"init_args": {"checkpoints": 3}}, "interpolation": {"knots": 2}}'
    ) == ExportOptions(
        method="rk4", gradient=RecursiveCheckpointed(3), interpolation=PiecewiseLinear(2)
    )
    assert options('{"gradient": {"class_path": "' + path + '.Backprop"}}').gradient == Backprop()
    with pytest.raises(argparse.ArgumentError):
        options('{"gradient": {"class_path": "' + path + '.PiecewiseLinear"}}')
