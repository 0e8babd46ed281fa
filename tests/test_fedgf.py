"""FedGF (algorithms-family.md, section 10): the client's interpolated gradient point, the server's
κ, divergence and global point, and the project's rule for τ_D.

Hooks: τ_D = ∞ (κ ≡ 0) ≡ FedSAM with a weighted FedAvg server; κ_{t+1} is the fraction of the
last min(W, t+1) rounds with D > τ_D; with κ = 1 and a fixed minibatch every step's gradient is the
same; ‖w̃_{t+1} − w_{t+1}‖ = ρ_g.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedsam import wire
from fedsam.optim import SAM, GlobalFlatSAM
from strategies import FedGF, FedSAM
from tests import reference as ref
from tests.test_family_server import Scripted, close, flat, play, record_vector, start
from tests.test_optim import Problem


def test_the_second_pass_runs_at_kappa_w_tilde_plus_one_minus_kappa_w_plus_eps():
    prob = Problem(torch.float64)
    opt = GlobalFlatSAM(prob.model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    point = [p.detach() + 0.3 * torch.randn_like(p) for p in prob.model.parameters()]
    flat_point = torch.cat([p.reshape(-1) for p in point])
    opt.load_global(point, kappa=0.4)
    w = prob.flat()
    for _ in range(3):
        opt.step(prob.closure(opt))
        g = ref.grad(prob.flat_loss, w)
        p = 0.4 * flat_point + 0.6 * (w + ref.sam_perturbation(g, w, 0.1))
        w = w - 0.1 * ref.grad(prob.flat_loss, p)
    torch.testing.assert_close(prob.flat(), w, rtol=1e-10, atol=1e-12)


def test_kappa_one_takes_every_gradient_at_the_global_point_and_kappa_zero_is_sam():
    prob = Problem(torch.float64)
    opt = GlobalFlatSAM(prob.model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.load_global([p.detach().clone() for p in prob.model.parameters()], kappa=1.0)
    seen = []
    for _ in range(3):
        opt.step(prob.closure(opt))
        seen.append(prob.seen[-1])  # the point of the second pass
    assert all(torch.equal(s, seen[0]) for s in seen)  # the same point, so the same gradient
    a, b = Problem(torch.float64), Problem(torch.float64)
    gf = GlobalFlatSAM(a.model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    gf.load_global([p.detach() for p in a.model.parameters()], kappa=0.0)
    sam = SAM(b.model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for _ in range(3):
        gf.step(a.closure(gf))
        sam.step(b.closure(sam))
    assert torch.equal(a.flat(), b.flat())


def test_an_infinite_threshold_is_fedsam():
    x = list(play(FedGF(4, 2, seed=3, threshold=math.inf), Scripted(4, seed=31), start(), 3,
                  config={"lr": 0.1, "optimizer": "gf-sam"}))
    y = list(play(FedSAM(4, 2, seed=3), Scripted(4, seed=31), start(), 3))
    for a, b in zip(x, y):
        assert torch.equal(flat(a[3]), flat(b[3]))


def test_kappa_divergence_and_the_global_point():
    N, W, tau, rho_g = 5, 3, 1.9, 0.25
    clients = Scripted(N, seed=32)
    strategy = FedGF(N, 3, seed=4, threshold=tau, window=W, global_rho=rho_g)
    divergences, point, kappa = [], None, 0.0
    for rnd, sampled, before, after, metrics in play(strategy, clients, start(), 6):
        for pid in sampled:
            content = clients.received[pid]
            assert content["config"]["gf-kappa"] == pytest.approx(kappa)
            if point is None or kappa == 0:
                assert wire.GLOBAL_POINT not in content
            else:
                close(record_vector(content, wire.GLOBAL_POINT, pid), point)
        divergences.append(sum(float(clients.deltas[p].norm()) for p in sampled) / len(sampled))
        recent = divergences[-W:]
        kappa = sum(d > tau for d in recent) / len(recent)
        assert strategy.kappa == pytest.approx(kappa) and metrics["gf-kappa"] == pytest.approx(kappa)
        q = flat(before) - flat(after)
        point = flat(after) + rho_g * q / q.norm()
        close(flat(strategy.global_point), point)
        assert float((flat(strategy.global_point) - flat(after)).norm()) == pytest.approx(rho_g, rel=1e-9)
    assert 0 < kappa < 1 or any(d > tau for d in divergences)


def test_the_measured_threshold_is_the_median_of_the_calibration_rounds():
    strategy = FedGF(4, 2, seed=5, calibration=4, window=30)
    for _, _, _, _, metrics in play(strategy, Scripted(4, seed=33), start(), 6,
                                    config={"lr": 0.1, "optimizer": "gf-sam"}):
        if len(strategy.divergences) < 4:
            assert strategy.tau() is None and strategy.kappa == 0.0
    import statistics

    tau = statistics.median(strategy.divergences[:4])
    assert strategy.tau() == tau
    assert strategy.kappa == pytest.approx(sum(d > tau for d in strategy.divergences) / 6)
