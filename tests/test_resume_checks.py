"""What ``fedsam run --resume`` and a sweep refuse before anything starts, on hand-made run folders:
files that disagree, a ``--rounds`` change a schedule cannot take, and an end at an unevaluated round."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from simulations import checkpoint
from simulations.config import ExperimentConfig
from simulations.sweep import PlannedRun, state_of
from tests.helpers import run_cli


def _stopped_run(folder, cifar10_dir, done=3, evaluated=True, **settings):
    """A run of 4 rounds stopped with a checkpoint after round ``done``."""
    cfg = ExperimentConfig(data_dir=str(cifar10_dir), out=str(folder), rounds=4, device="cpu", **settings).resolved()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    records = [{"round": r, "train_loss": 1.0, **({"test_accuracy": 0.2, "test_loss": 2.0} if evaluated else {})}
               for r in range(1, done + 1)]
    checkpoint.save(folder, {"round": done, "config": cfg.to_dict(), "arrays": {}, "strategy": {},
                             "records": records, "torch_rng": torch.get_rng_state()})
    return cfg


def test_a_config_json_that_disagrees_with_its_checkpoint_is_refused(cifar10_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _stopped_run(run, cifar10_dir)
    (run / "config.json").write_text(json.dumps({**cfg.to_dict(), "lr": 0.5}))
    code, _, err = run_cli(["run", "--resume", run], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "config.json says --lr 0.5 but its checkpoint ran with 0.05: the run's files disagree" in err


@pytest.mark.parametrize("rounds", [3, 6])
def test_ssam_d_runs_keep_their_rounds_on_resume_and_in_a_sweep(cifar10_dir, tmp_path, capsys, rounds):
    """SSAM-D's drop rate is a cosine over the run's rounds: other rounds would redraw those already run."""
    run = tmp_path / "run"
    cfg = _stopped_run(run, cifar10_dir, optimizer="ssam-d")
    code, _, err = run_cli(["run", "--resume", run, "--rounds", rounds], capsys)
    assert code == 2 and "--rounds cannot change for this run: SSAM-D's drop rate" in err
    what, why = state_of(PlannedRun("run", {}, 0, dataclasses.replace(cfg, rounds=rounds)))
    assert what == "stale" and why.startswith(f"--rounds 4 instead of {rounds}")
    assert rounds < 4 or "SSAM-D's drop rate" in why


def test_ending_a_run_at_an_unevaluated_checkpoint_is_refused(cifar10_dir, tmp_path, capsys):
    """With --eval-every 2, round 3 has no test accuracy: ending there would write a summary whose
    "final" accuracy is round 2's beside round 3's model."""
    run = tmp_path / "run"
    _stopped_run(run, cifar10_dir, eval_every=2, evaluated=False)
    code, _, err = run_cli(["run", "--resume", run, "--rounds", 3], capsys)
    assert code == 2 and "would end the run at its checkpoint, whose round was not evaluated" in err
