from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
REAL_SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset"


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10: 1,000 training and 200 test images, 10 balanced classes."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


def run_cli(argv, capsys):
    """``fedsam ARGV`` in this process: (exit status, stdout, stderr)."""
    from simulations.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits itself for bad flags
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
