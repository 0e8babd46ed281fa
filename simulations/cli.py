"""The ``fedsam`` command: one subcommand per step of a study."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fedsam
from simulations.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) rather than usage plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="fedsam", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedsam {fedsam.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    from simulations import bench, partition, report, run, sharpness, sweep

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

