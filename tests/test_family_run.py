"""The drift-correcting methods end to end: strategy, wire and the real ClientApp, in process
(exact resume after kill -9, client state included, is in test_resilience.py).

The exact client and server rules are checked in ``test_family_client.py`` and
``test_family_server.py``; here the spec's equivalences (algorithms-family.md) check that what the
server sends is what the clients apply, on the synthetic CIFAR-10, through ``run_experiment``:

- FedCM with α = 1 ≡ FedAvg, bit for bit (2);
- FedProx with μ = 0 ≡ FedAvg, bit for bit (1);
- relaxed initialisation: round 1 ≡ FedAvg's, later rounds start apart (0.6; β = 0 sends no start:
  ``test_family_server.py``);
- SCAFFOLD's round 1 ≡ FedAvg's round 1, bit for bit, and its later rounds differ (3);
- FedGAMMA with ρ = 0 ≡ SCAFFOLD, FedSpeed and FedSMOO with ρ = 0 ≡ FedDyn, MoFedSAM with ρ = 0 ≡
  FedCM (2, 6, 7, 8), and FedLESAM, -S, -D with ρ = 0 ≡ FedAvg, SCAFFOLD, FedDyn (9), bit for bit:
  a SAM step at ρ = 0 takes its second pass at ``w`` itself;
- FedGAMMA's round 1 ≡ FedSAM's round 1, bit for bit (6: no control variate yet);
- every method records client drift, top-5 accuracy, and its correction's norm where it has one;
"""

from __future__ import annotations

import json

import pytest
import torch

from fedsam.client_app import app
from simulations import checkpoint
from simulations import config as configuration
from tests.inprocess import InProcessGrid, run_inprocess

pytestmark = pytest.mark.long  # whole runs in process: CI runs them, the quick subset leaves them out

BASE = dict(num_clients=3, clients_per_round=2, rounds=3, device="cpu", batch_size=50, lr=0.05,
            weight_decay=1e-3, grad_clip=10.0, checkpoint_every=1)


def _run(cifar10_dir, out, **changes):
    values = {"data_dir": str(cifar10_dir), "out": str(out), **BASE, **changes}
    cfg = configuration.apply(configuration.ExperimentConfig(), values, "test").resolved()
    configuration.validate(cfg)
    run_inprocess(cfg)
    return out


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _model(out):
    return torch.load(out / "model.pt")


def _same_model(a, b, tol=None):
    ma, mb = _model(a), _model(b)
    for k in ma:
        if tol is None:
            assert torch.equal(ma[k], mb[k]), k
        else:
            torch.testing.assert_close(ma[k], mb[k], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def fedavg(cifar10_dir, tmp_path_factory):
    return _run(cifar10_dir, tmp_path_factory.mktemp("fedavg") / "run", strategy="fedavg")


def test_fedcm_with_alpha_one_and_fedprox_with_mu_zero_are_fedavg(cifar10_dir, tmp_path, fedavg):
    for name, changes in (("fedcm", dict(strategy="fedcm", momentum_alpha=1.0)),
                          ("fedprox", dict(strategy="fedprox", prox_mu=0.0))):
        out = _run(cifar10_dir, tmp_path / name, **changes)
        _same_model(out, fedavg)
        ours, theirs = _records(out), _records(fedavg)
        assert [r["test_accuracy"] for r in ours] == [r["test_accuracy"] for r in theirs]


def test_scaffold_round_one_is_fedavg_and_later_rounds_are_corrected(cifar10_dir, tmp_path, fedavg):
    out = _run(cifar10_dir, tmp_path / "scaffold", strategy="scaffold")
    ours, theirs = _records(out), _records(fedavg)
    assert ours[0]["test_loss"] == theirs[0]["test_loss"] and ours[0]["train_loss"] == theirs[0]["train_loss"]
    assert ours[2]["test_loss"] != theirs[2]["test_loss"]
    assert all(r["correction_norm"] > 0 for r in ours)
    assert all(r["client_drift"] > 0 and 0 <= r["test_top5_accuracy"] <= 1 for r in ours)
    assert all(r["test_top5_accuracy"] >= r["test_accuracy"] for r in ours)


def test_relaxed_initialisation_starts_apart_from_round_two_and_zero_is_off(cifar10_dir, tmp_path, fedavg):
    """0.6: round 1 starts at w_t (= w_0) so it equals FedAvg's; from round 2 on the clients start
    from w_t + β(w_t − w_i^last) and the run departs from FedAvg."""
    relaxed = _records(_run(cifar10_dir, tmp_path / "ri", strategy="fedavg", relaxed_init=0.5))
    plain = _records(fedavg)
    assert relaxed[0]["test_loss"] == plain[0]["test_loss"]
    assert relaxed[2]["test_loss"] != plain[2]["test_loss"]


SLOW = pytest.mark.slow  # the same wiring as a kept pair; run them with the whole suite


@pytest.mark.parametrize("sam,plain", [("fedgamma", "scaffold"), ("fedsmoo", "feddyn"), ("fedlesam", "fedavg"),
                                      pytest.param("fedspeed", "feddyn", marks=SLOW),
                                      pytest.param("mofedsam", "fedcm", marks=SLOW),
                                      pytest.param("fedlesam-s", "scaffold", marks=SLOW),
                                      pytest.param("fedlesam-d", "feddyn", marks=SLOW)])
def test_sam_variants_with_a_zero_radius_are_their_base_methods(cifar10_dir, tmp_path, sam, plain):
    a = _run(cifar10_dir, tmp_path / sam, strategy=sam, rho=0.0, rounds=2)  # round 2 carries the corrections
    b = _run(cifar10_dir, tmp_path / plain, strategy=plain, rounds=2)
    _same_model(a, b)
    assert [r["test_loss"] for r in _records(a)] == [r["test_loss"] for r in _records(b)]


def test_fedgamma_round_one_is_fedsam_round_one(cifar10_dir, tmp_path):
    """FedGAMMA hook (6): before any control variate exists its clients are FedSAM's, at the same ρ."""
    a = _run(cifar10_dir, tmp_path / "fedgamma", strategy="fedgamma", rho=0.1, rounds=1)
    b = _run(cifar10_dir, tmp_path / "fedsam", strategy="fedsam", rho=0.1, rounds=1)
    _same_model(a, b)


def test_fedgloss_without_server_radius_and_duals_is_fedsam(cifar10_dir, tmp_path):
    """FedGloSS hook (11): ρ = 0 and 1/β = 0 is FedSAM(ρ_l) (its server SGD step is FedAvg's). One
    round: FedGloSS averages in float64 and Flower's FedAvg in float32, and SAM's normalised ascent
    lets later rounds amplify that last bit; the server rule itself is checked over several rounds
    in test_fedgloss.py."""
    a = _run(cifar10_dir, tmp_path / "gloss", strategy="fedgloss", gloss_server_rho=0.0, gloss_beta=float("inf"),
             rho=0.1, rounds=1)
    b = _run(cifar10_dir, tmp_path / "fedsam", strategy="fedsam", rho=0.1, rounds=1)
    _same_model(a, b, tol=1e-6)


def test_fedgf_with_an_infinite_threshold_is_fedsam(cifar10_dir, tmp_path):
    """FedGF hook (10): τ_D = ∞ keeps κ = 0, and gf-sam with κ = 0 is SAM bit for bit."""
    a = _run(cifar10_dir, tmp_path / "gf", strategy="fedgf", gf_threshold=float("inf"), rho=0.1, rounds=2)
    b = _run(cifar10_dir, tmp_path / "fedsam", strategy="fedsam", rho=0.1, rounds=2)
    _same_model(a, b)


class KilledAfter(InProcessGrid):
    """A grid whose process "dies" (KeyboardInterrupt) when round ``rounds + 1`` starts training."""

    def __init__(self, *args, rounds: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds, self.trained = rounds, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.trained += 1
            if self.trained > self.rounds:
                raise KeyboardInterrupt("killed")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("changes", [dict(strategy="fedgloss", gloss_warmup=2, swa_start=2),
                                     dict(strategy="fedlesam", swa_start=2), dict(strategy="scaffold"),
                                     dict(strategy="feddyn"), dict(strategy="fedsmoo", optimizer="dual-sam"),
                                     dict(optimizer="ssam-d", ssam_sparsity=0.5, ssam_update_freq=1)],
                         ids=["fedgloss-duals-and-swa", "fedlesam-memory-and-swa", "scaffold-c_i", "feddyn-h_i",
                              "fedsmoo-duals", "ssam-d-masks"])
def test_a_run_killed_after_a_checkpoint_resumes_exactly(cifar10_dir, tmp_path, changes):
    """The state of the global-perturbation methods, of SWA and the client state kept on the server
    (SCAFFOLD's c_i, FedDyn's h_i, FedSMOO's duals, Sparse SAM's masks) travels in the checkpoint: a
    run stopped after round 2 and resumed equals the uninterrupted run (test_resilience.py kills a
    real run with -9 and resumes it through the same checkpoint). SSAM-D's random draws must not
    depend on whether the worker kept its optimizer from an earlier run or round."""
    whole = _run(cifar10_dir, tmp_path / "whole", **changes)
    values = {"data_dir": str(cifar10_dir), "out": str(tmp_path / "part"), **BASE, **changes}
    cfg = configuration.apply(configuration.ExperimentConfig(), values, "test").resolved()
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(cfg, KilledAfter(app, cfg.num_clients, rounds=2))
    state = checkpoint.load(tmp_path / "part")
    assert state["round"] == 2 and ("swa" in state["strategy"]) == ("swa_start" in changes)
    run_inprocess(cfg, resume=state)
    assert _records(tmp_path / "part") == _records(whole)
    _same_model(tmp_path / "part", whole)


def test_a_resume_that_resolves_auto_settings_differently_says_so(cifar10_dir, tmp_path, capsys):
    """The checkpoint keeps how this machine resolved "auto" (device, precision, batched clients);
    a resume elsewhere that resolves them otherwise continues, with one line saying the run will not
    match an uninterrupted one. The same machine says nothing."""
    values = {"data_dir": str(cifar10_dir), "out": str(tmp_path / "part"), **BASE, "rounds": 2}
    cfg = configuration.apply(configuration.ExperimentConfig(), values, "test").resolved()
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(cfg, KilledAfter(app, cfg.num_clients, rounds=1))
    state = checkpoint.load(tmp_path / "part")
    assert state["execution"] == {"device": "cpu", "precision": "fp32", "batched clients": False}
    capsys.readouterr()
    run_inprocess(cfg, resume={**state, "execution": {**state["execution"], "device": "cuda"}})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rounds 1-1 ran with device cuda" in err and "will not match" in err
