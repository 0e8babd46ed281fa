"""FedGloSS (algorithms-family.md, section 11) through scripted clients: the perturbed model sent,
the duals, the server SGD step, the warm-up, and the spec's hooks:

- ρ = 0 and 1/β = 0 ≡ FedAvg with server SGD (the duals stay zero);
- round 1 sends the unperturbed w_0, later rounds w_t + ρ_s·Δ̃/‖Δ̃‖;
- with ρ = 0, the paper's dual step, η_g = 1, μ_s = 0 and equal n_i, the run is FedDyn with
  λ = 1/β (−β·σ = mean_N(h_j), −σ_i = λ·h_i).
"""

from __future__ import annotations

import math

import pytest
import torch

from fedsam import wire
from strategies import FedAvg, FedDyn, FedGloSS
from tests import reference_family as ref
from tests.test_family_server import Scripted, close, flat, play, record_vector, start


def test_no_radius_and_no_duals_is_fedavg_with_server_sgd():
    a = list(play(FedGloSS(4, 2, seed=2, rho=0.0, beta=math.inf, server_lr=0.7), Scripted(4, seed=21), start(), 3))
    b = list(play(FedAvg(4, 2, seed=2, server_lr=0.7), Scripted(4, seed=21), start(), 3))
    for x, y in zip(a, b):
        close(flat(x[3]), flat(y[3]), 1e-12)


def test_the_server_perturbs_along_the_last_pseudo_gradient_and_steps_with_duals():
    N, beta, rho, eta, mu = 5, 4.0, 0.2, 0.9, 0.5
    clients = Scripted(N, seed=22)
    strategy = FedGloSS(N, 3, seed=6, beta=beta, rho=rho, server_lr=eta, server_momentum=mu)
    sigma, table, pseudo, buf = torch.zeros(8, dtype=torch.float64), {}, None, None
    for rnd, sampled, before, after, metrics in play(strategy, clients, start(), 4):
        w_t = flat(before)
        sent = flat({k: clients.received[sampled[0]]["arrays"][k].numpy() for k in ("w", "b")})
        if pseudo is None:
            assert torch.equal(sent, w_t)  # round 1: w_0 itself
        else:
            close(sent, w_t + rho * pseudo / pseudo.norm())
        for pid in sampled:
            own = record_vector(clients.received[pid], wire.CORRECTION, pid)
            if pid in table:
                close(own, -table[pid])
            else:
                assert own is None
            config = clients.received[pid]["config"]
            assert config["anchor-pull"] == 1 / beta == config["direction-decay"]
        deltas = [clients.deltas[p] for p in sampled]
        for p, d in zip(sampled, deltas):
            table[p] = table.get(p, torch.zeros(8, dtype=torch.float64)) - d / beta
        sigma = sigma - sum(deltas) / (beta * N * len(sampled))
        pseudo = -ref.weighted_mean(deltas, [clients.n[p] for p in sampled])
        buf = pseudo if buf is None else mu * buf + pseudo
        close(flat(after), w_t - eta * buf - beta * sigma, 1e-12)
        assert metrics["correction-norm"] == pytest.approx(float(sigma.norm()), rel=1e-9)


def test_with_the_paper_dual_and_no_radius_it_is_feddyn():
    N, beta = 4, 5.0
    scripted = Scripted(N, seed=23)
    scripted.n = {pid: 20 for pid in range(N)}  # equal n_i: the weighted and plain means agree
    twin = Scripted(N, seed=23)
    twin.n = dict(scripted.n)
    gloss = list(play(FedGloSS(N, 2, seed=7, beta=beta, rho=0.0, dual="paper"), scripted, start(), 4))
    dyn = list(play(FedDyn(N, 2, seed=7, lam=1 / beta), twin, start(), 4))
    for x, y in zip(gloss, dyn):
        close(flat(x[3]), flat(y[3]), 1e-12)


def test_the_warm_up_ramps_both_radii_from_rho0():
    strategy = FedGloSS(2, 2, rho=0.15, client_rho=0.2, warmup_rounds=4, rho0=0.001)
    assert [strategy.radius(r, 0.15) for r in (1, 3, 5, 6)] == pytest.approx([0.001, 0.001 + 2 * 0.149 / 4, 0.15, 0.15])
    assert FedGloSS(2, 2, warmup_rounds=1).radius(1, 0.15) == 0.15
    clients = Scripted(2, seed=24)
    next(play(strategy, clients, start(), 1, config={"lr": 0.1, "optimizer": "sam"}))
    assert clients.received[0]["config"]["rho"] == pytest.approx(0.001)  # ρ_l(0) = ρ_0



def test_a_warm_up_from_rho0_zero_starts_with_a_plain_step_that_the_clients_accept():
    """ρ_0 = 0 is allowed (spec 11: ρ_0 ≥ 0): round 1 sends ρ_l = 0, which SAM takes as its base step."""
    from torch import nn

    from fedsam.optim import build

    strategy = FedGloSS(2, 2, client_rho=0.2, warmup_rounds=4, rho0=0.0)
    clients = Scripted(2, seed=25)
    next(play(strategy, clients, start(), 1, config={"lr": 0.1, "optimizer": "sam"}))
    sent = clients.received[0]["config"]["rho"]
    assert sent == 0.0
    assert build("sam", nn.Linear(2, 2).parameters(), lr=0.1, rho=sent).param_groups[0]["rho"] == 0.0


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_a_non_positive_beta_is_refused(beta):
    with pytest.raises(ValueError, match="beta"):
        FedGloSS(2, 2, beta=beta)


def test_state_survives_a_checkpoint():
    from tests.test_family_server import test_state_survives_a_checkpoint_exactly as check

    check(lambda: FedGloSS(5, 2, seed=1, beta=3.0, rho=0.1, server_momentum=0.5))
