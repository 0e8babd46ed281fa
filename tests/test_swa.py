"""Server-side SWA (algorithms-family.md, section 14; rounds here are 1-based, the spec's t is
round − 1): the cyclic lr, the running mean, the copy at the start, "after the last round" is no
SWA, and a run's evaluation and model.pt use the SWA model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from simulations import config as configuration
from strategies import FedAvg
from strategies.swa import SWA
from tests.inprocess import run_inprocess
from tests.test_family_server import Scripted, flat, play, start


def test_the_cyclic_lr_of_the_spec():
    swa = SWA(start=7501, cycle=10, lr=1e-4)
    assert swa.client_lr(7500, 0.01) == 0.01  # before the start: η_1
    for rnd in range(7501, 7541):
        t = rnd - 1
        if t % 10 == 9:
            assert swa.client_lr(rnd, 0.01) == 1e-4  # exactly η_2
        if t % 10 == 0:
            assert swa.client_lr(rnd, 0.01) == pytest.approx(0.00901, rel=1e-12)
    assert SWA(start=5, cycle=1, lr=1e-4).client_lr(9, 0.01) == 0.01  # c = 1: η_2 unused


def _record(vector):
    return ArrayRecord({"w": Array(np.asarray(vector, dtype=np.float32))})


def test_after_k_collections_the_swa_model_is_the_mean_of_the_collected_models():
    swa = SWA(start=3, cycle=2)
    models = {r: np.random.default_rng(r).normal(size=4) for r in range(1, 12)}  # w_{r+1}, the model after round r
    for rnd in range(1, 12):
        swa.begin_round(rnd, _record(models[rnd - 1] if rnd > 1 else np.zeros(4)))
        if rnd == 3:
            np.testing.assert_array_equal(swa.arrays()["w"].numpy(), models[2].astype(np.float32))  # the copy
        swa.end_round(rnd, _record(models[rnd]))
    collected = [models[r].astype(np.float32).astype(np.float64) for r in (5, 7, 9, 11)]  # r > 3, (r − 3) mod 2 = 0
    assert swa.collected == 4
    np.testing.assert_allclose(swa.model["w"], np.mean(collected, axis=0), rtol=1e-12)


@pytest.mark.parametrize("collect,rounds", [("reference", (21, 31)), ("end-of-cycle", (20, 30))])
def test_each_collection_rule_averages_its_own_rounds_models(collect, rounds):
    """Start 1 + 10 (t_s = 10, a multiple of c = 10): the reference collects after the rounds with
    t mod 10 = 0, each cycle's highest-lr round (τ = 1/c); end-of-cycle after t mod 10 = 9, the
    lowest-lr one, whose clients used exactly η_2 (spec 14)."""
    swa = SWA(start=11, cycle=10, lr=1e-4, collect=collect)
    models = {r: np.random.default_rng(r).normal(size=3) for r in range(0, 35)}
    for rnd in range(1, 35):
        swa.begin_round(rnd, _record(models[rnd - 1]))
        swa.end_round(rnd, _record(models[rnd]))
    collected = [models[r].astype(np.float32).astype(np.float64) for r in rounds]
    assert swa.collected == len(rounds)
    np.testing.assert_allclose(swa.model["w"], np.mean(collected, axis=0), rtol=1e-12)
    if collect == "end-of-cycle":
        assert all(swa.client_lr(r, 0.01) == 1e-4 for r in rounds)


def test_a_start_after_the_last_round_is_no_swa_and_swa_evaluates_its_average():
    plain = list(play(FedAvg(4, 2, seed=1), Scripted(4, seed=3), start(), 3))
    late = FedAvg(4, 2, seed=1, swa=SWA(start=4))
    rounds = list(play(late, Scripted(4, seed=3), start(), 3))
    assert all(np.array_equal(flat(a[3]), flat(b[3])) for a, b in zip(plain, rounds))
    assert late.evaluation_arrays(_record(np.zeros(8))) is not None and not late.swa.active
    early = FedAvg(4, 2, seed=1, swa=SWA(start=2))
    rounds = list(play(early, Scripted(4, seed=3), start(), 3))
    only = flat(rounds[2][3])  # round 2 took the copy; the model after round 3 is the one collection
    evaluated = early.evaluation_arrays(ArrayRecord({k: Array(v) for k, v in rounds[2][3].items()}))
    torch.testing.assert_close(flat({k: evaluated[k].numpy() for k in ("w", "b")}), only, rtol=1e-12, atol=1e-12)


@pytest.mark.long
def test_a_run_with_swa_evaluates_and_saves_the_average_and_keeps_the_global_model(cifar10_dir, tmp_path):
    values = {"data_dir": str(cifar10_dir), "out": str(tmp_path / "swa"), "num_clients": 3, "clients_per_round": 2,
              "rounds": 4, "device": "cpu", "batch_size": 50, "swa_start": 2, "swa_cycle": 1}
    cfg = configuration.apply(configuration.ExperimentConfig(), values, "test").resolved()
    run_inprocess(cfg)
    records = [json.loads(line) for line in (tmp_path / "swa" / "metrics.jsonl").read_text().splitlines()]
    assert "swa_models" not in records[0] and [r["swa_models"] for r in records[1:]] == [0, 1, 2]
    swa_model = torch.load(tmp_path / "swa" / "model.pt")
    global_model = torch.load(tmp_path / "swa" / "model-global.pt")
    assert any(not torch.equal(swa_model[k], global_model[k]) for k in swa_model)


def test_the_progress_line_says_when_the_accuracy_is_the_swa_models(tmp_path):
    from simulations.results import RunRecorder

    recorder = RunRecorder(tmp_path, rounds=4, title="t", echo=False)
    record = {"round": 2, "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 0.5, "seconds": 1.0}
    assert "test acc 0.5000" in recorder.progress_line(record)
    assert "test acc (SWA model) 0.5000" in recorder.progress_line({**record, "swa_models": 0})
    assert RunRecorder.progress_round(recorder.progress_line({**record, "swa_models": 0})) == 2
