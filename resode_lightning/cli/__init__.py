"""The ``resode`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
The command is documented by its ``--help``; the modules are internal: the promised API of the
package is the top-level ``resode_lightning``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from resode_lightning.cli import bench, convert, distill, export, smoothness
from resode_lightning.cli import train as training

SUBCOMMANDS = {
    "convert": convert,
    "smoothness": smoothness,
    "export": export,
    "distill": distill,
    "bench": bench,
}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other refusal of the ``resode`` command."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="resode",
        description="Production ResNets as discretized neural ODEs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in training.COMMANDS.items():  # parsed by LightningCLI, see main
        commands.add_parser(name, help=f"{help_text}; see resode {name} --help", add_help=False)
    for name, module in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``resode`` with ``argv`` (default: the process arguments); returns the exit status.

    A bad input file, value or output path ends with one line on stderr and status 2.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments and arguments[0] in training.COMMANDS:
        return training.main(argv)
    args = build_parser().parse_args(arguments)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (ValueError, OSError) as error:  # CheckpointError, missing or unwritable paths
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"resode {args.command}: error: {message}", file=sys.stderr)
        return 2
