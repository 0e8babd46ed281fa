"""``scripts/sam_slow_start.py``, the results' evidence for SAM's slow start, on synthetic data."""

from __future__ import annotations

import math

import pytest

from scripts import sam_slow_start


@pytest.mark.long
def test_only_the_optimizer_differs_between_the_curves(cifar10_dir):
    """Same initial weights and batches: SAM with a vanishing ρ retraces SGD's curve."""
    curves = sam_slow_start.loss_per_epoch(str(cifar10_dir), rhos=[1e-9, 0.1], epochs=2)
    assert list(curves) == ["sgd", "sam rho=1e-09", "sam rho=0.1"]
    assert all(len(c) == 2 and all(math.isfinite(x) for x in c) for c in curves.values())
    assert curves["sam rho=1e-09"] == pytest.approx(curves["sgd"], rel=1e-4)
    assert curves["sgd"][1] < curves["sgd"][0]  # the synthetic classes are learnable
    assert curves["sam rho=0.1"] != pytest.approx(curves["sgd"], rel=1e-4)


@pytest.mark.long
def test_the_command_prints_one_row_per_optimizer(cifar10_dir, capsys):
    assert sam_slow_start.main(["--data-dir", str(cifar10_dir), "--rho", "0.05", "--epochs", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("optimizer") and [r.split()[0] for r in rows[1:]] == ["sgd", "sam"]
