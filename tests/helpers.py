"""What many test modules share: where things are, and the ``fedsam`` command run in process."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset"


def run_cli(argv, capsys):
    """``fedsam ARGV`` in this process: (exit status, stdout, stderr)."""
    from simulations.cli import status

    code = status([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
