"""The ``fedsam`` command: one subcommand per step of a study."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

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


def exit_without_teardown(code: int) -> NoReturn:
    """End a finished command at once. After every ``fedsam run`` the interpreter's teardown of
    torch's, Ray's and Flower's modules took 1.2 s on 2 cores, and it frees nothing the OS does
    not: the exit handlers libraries registered still run (Ray's shutdown, logging's last flush,
    ...), then the streams are flushed, and only the teardown itself is skipped. The usual exit,
    which waits, is kept where something may still need the teardown or write after ``main``: a
    non-daemon thread still working, a profiler or tracer in charge (cProfile writes its file
    after the code returns)."""
    busy = any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())
    if busy or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`fedsam report | head`) or stream
            pass
    os._exit(code)


def status(argv: Sequence[str] | None = None) -> int:
    """``main``'s exit status, argparse's own exits (``--help``, ``--version``, bad flags) included."""
    try:
        return main(argv)
    except SystemExit as exc:
        if not (exc.code is None or isinstance(exc.code, int)):
            raise
        return exc.code or 0


def entry() -> NoReturn:
    """The ``fedsam`` command and ``python -m simulations``: ``main`` in a process of its own, so it
    may end without the teardown; ``status`` returns, for tests and callers in process. An
    exception out of ``main`` (a traceback) ends the process the usual way."""
    exit_without_teardown(status())
