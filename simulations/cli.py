"""The ``fedsam`` command: one subcommand per step of a study."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import fedsam


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) rather than usage plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def run_command(values: dict[str, Any]) -> list[str]:
    """The ``fedsam run`` argv for these settings (field names or flag names; ``None`` left out,
    booleans as ``--x`` / ``--no-x``): the one place a run's command line is built."""
    argv = [sys.executable, "-m", "simulations", "run"]
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + str(name).replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="fedsam", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedsam {fedsam.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    from simulations import bench, partition, report, run, sharpness, sweep  # they import UsageError from here

    partition.register(subparsers)
    run.register(subparsers)
    sweep.register(subparsers)
    report.register(subparsers)
    sharpness.register(subparsers)
    bench.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"fedsam {args.command}: error: {exc}\n")
        return 2

