"""Export options: one validated object that the signature, the file, the callback and the CLI
derive from."""

import argparse
from dataclasses import fields

import pytest

from resode_lightning import NeuralODEExport
from resode_lightning.cli.export import add_option_arguments, options_from
from resode_lightning.export.options import ExportOptions


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "rk5"}, "method must be one of"),
        ({"gradient": "magic"}, "gradient must be one of"),
        ({"interpolation": "cubic"}, "interpolation must be one of"),
        ({"method": "dopri5", "steps": 4}, "steps=4 is for fixed-grid methods"),
        ({"steps": 0}, r"steps must be an int in \[1, 100,000\]"),
        ({"steps": {"layer1": 0}}, r"steps\['layer1'\] must be an int in"),
        ({"knots": 1}, "knots must be an int >= 2"),
        ({"knots": 3, "interpolation": "constant"}, "knots=... fits a linear path"),
        ({"rtol": 0}, r"rtol must be in \[1e-12, 1\]"),
        ({"gradient": "recursive", "method": "dopri5"}, "gradient='recursive' needs a method"),
        ({"checkpoints": 3}, "only given with gradient='recursive'"),
        (
            {"gradient": "recursive", "checkpoints": 0},
            r"checkpoints must be an int in \[1, 100,000\]",
        ),
        ({"fold_bn": "yes"}, "fold_bn must be a bool"),
    ],
)
def test_invalid_options_are_refused_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        ExportOptions(**changes)
    with pytest.raises(ValueError, match=message):
        NeuralODEExport("x.pt", **changes)


def test_config_round_trip_and_unknown_names():
    options = ExportOptions(method="rk4", steps={"layer3": 3}, gradient="recursive", checkpoints=3)
    assert ExportOptions.from_config(options.to_config()) == options
    with pytest.raises(ValueError, match=r"unknown export option\(s\) \['colour'\]"):
        ExportOptions.from_config({**options.to_config(), "colour": "red"})
    with pytest.raises(ValueError, match="unknown export option"):
        options.replace(colour="red")


def test_every_option_is_a_cli_argument():
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    assert options_from(parser.parse_args([])) == ExportOptions()
    args = parser.parse_args(
        ["--method", "rk4", "--steps", "0.5", "--gradient", "recursive", "--checkpoints", "3"]
        + ["--no-fold-bn", "--knots", "2"]
    )
    assert options_from(args) == ExportOptions(
        method="rk4", steps=0.5, gradient="recursive", checkpoints=3, fold_bn=False, knots=2
    )
    flags = {action.dest for action in parser._actions}
    assert {option.name for option in fields(ExportOptions)} <= flags
