"""``scripts/plateau.py``, the results' check of whether the decaying-rate curves have levelled off."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts import plateau


def test_a_straight_line_climbs_by_its_slope_and_a_constant_does_not():
    """acc = 20 + 0.5 · round: windows of 20 rounds differ by 10 points, the slope is 5 per 10 rounds."""
    rounds = np.arange(1, 101)
    p = plateau.plateau([20 + 0.5 * rounds, np.full(100, 30.0)], window=20)
    assert p["edges"] == [40, 60, 80, 100]
    assert p["means"][0] == pytest.approx([20 + 0.5 * 50.5, 20 + 0.5 * 70.5, 20 + 0.5 * 90.5])
    assert p["means"][1] == pytest.approx([30.0, 30.0, 30.0])
    assert p["step"] == pytest.approx([10.0, 0.0])
    assert p["slope"] == pytest.approx([5.0, 0.0], abs=1e-9)


def test_windows_end_at_the_last_round_every_seed_reached():
    p = plateau.plateau([np.arange(1.0, 106.0), np.arange(1.0, 101.0)], window=20)
    assert p["edges"] == [40, 60, 80, 100]  # 100 rounds in common; the longer run is cut there


def _run(folder, strategy, seed, accuracies):
    run = folder / f"strategy={strategy}__seed={seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"strategy": strategy, "seed": seed, "rounds": len(accuracies)}))
    lines = [{"round": r, "test_accuracy": a / 100} for r, a in enumerate(accuracies, start=1)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run / "summary.json").write_text("{}")


def test_the_command_groups_seeds_and_prints_one_line_per_configuration(tmp_path, capsys):
    flat, rising = [40.0] * 60, [float(r) for r in range(1, 61)]
    _run(tmp_path, "fedavg", 0, flat)
    _run(tmp_path, "fedavg", 1, flat)
    _run(tmp_path, "fedsam", 0, rising)
    assert plateau.main([str(tmp_path), "--window", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("strategy=fedavg (2 seeds, 60 rounds)  1-20: 40.0  21-40: 40.0  41-60: 40.0")
    assert "last step +0.00 ± 0.00" in lines[0]
    assert lines[1].startswith("strategy=fedsam (1 seeds, 60 rounds)") and "last step +20.00" in lines[1]
    assert "slope/10 rounds +10.00" in lines[1]


@pytest.mark.parametrize("args", [["{empty}"], ["{missing}"], ["{empty}", "--window", "0"]])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", missing=tmp_path / "missing") for a in args]
    assert plateau.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
