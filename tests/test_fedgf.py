"""FedGF (algorithms-family.md, section 10): the client's interpolated gradient point, the server's
κ, divergence and global point, and the project's rule for τ_D.

Hooks: τ_D = ∞ (κ ≡ 0) ≡ FedSAM with a weighted FedAvg server; κ_{t+1} is the fraction of the
last min(W, t+1) rounds with D > τ_D; with κ = 1 and a fixed minibatch every step's gradient is the
same; ‖w̃_{t+1} − w_{t+1}‖ = ρ_g.
"""

from __future__ import annotations

import math

import numpy as np
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
    """τ_D = ∞: every round sends κ = 0 and no w̃, and the server is FedSAM's (n_i-weighted FedAvg)."""
    gf_clients = Scripted(4, seed=31)
    x = play(FedGF(4, 2, seed=3, threshold=math.inf), gf_clients, start(), 3,
             config={"lr": 0.1, "optimizer": "gf-sam"})
    y = play(FedSAM(4, 2, seed=3), Scripted(4, seed=31), start(), 3)
    rounds = 0
    for (_, sampled, _, after, _), (_, _, _, other, _) in zip(x, y):
        rounds += 1
        assert sampled
        for pid in sampled:
            content = gf_clients.received[pid]
            assert content["config"]["gf-kappa"] == 0.0
            assert not any(k.startswith(wire.GLOBAL_POINT) for k in content.keys())
        assert torch.equal(flat(after), flat(other))
    assert rounds == 3


class SizedDraws:
    """Stands in for ``Scripted.rng`` once its sizes are drawn: the ``per_round`` updates of round
    ``r`` (1-based) all have norm ``sizes[r − 1]``, in random directions."""

    def __init__(self, sizes: list[float], per_round: int, seed: int) -> None:
        self.sizes, self.per_round, self.draws = sizes, per_round, 0
        self.rng = np.random.default_rng(seed)

    def normal(self, size: int) -> np.ndarray:
        v = self.rng.normal(size=size)
        norm = self.sizes[self.draws // self.per_round]
        self.draws += 1
        return norm * v / np.linalg.norm(v)


def test_kappa_divergence_and_the_global_point():
    """κ_{t+1} = the fraction of the last min(W, t+1) rounds with D > τ_D, D_t = mean_S ‖w_i − w_t‖;
    w̃_{t+1} = w_{t+1} + ρ_g q/‖q‖ with q = w_t − w_{t+1}, sent (with κ) in the next round."""
    N, k, W, tau, rho_g = 5, 3, 3, 2.0, 0.25
    sizes = [3.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0]  # D of rounds 1..8: above, below, above, above, below...
    # κ after round r, by hand: window [1] → 1; [1,0] → 1/2; [1,0,1] → 2/3; then the last W = 3 only:
    # [0,1,1] → 2/3 (all four: 3/4); [1,1,0] → 2/3 (3/5); [1,0,0] → 1/3 (3/6); [0,0,0] → 0 (3/7); → 0
    expected = [1.0, 1 / 2, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 0.0, 0.0]
    clients = Scripted(N, seed=32)
    clients.rng = SizedDraws(sizes, k, seed=32)
    strategy = FedGF(N, k, seed=4, threshold=tau, window=W, global_rho=rho_g)
    point, kappa = None, 0.0  # κ_0 = 0 and no w̃ in round 0
    for rnd, sampled, before, after, metrics in play(strategy, clients, start(), len(sizes)):
        assert len(sampled) == k
        for pid in sampled:
            content = clients.received[pid]
            assert content["config"]["gf-kappa"] == kappa
            if kappa == 0:
                assert wire.GLOBAL_POINT not in content
            else:
                close(record_vector(content, wire.GLOBAL_POINT, pid), point)
            assert float(clients.deltas[pid].norm()) == pytest.approx(sizes[rnd - 1], rel=1e-12)
        assert metrics["gf-divergence"] == pytest.approx(sizes[rnd - 1], rel=1e-9)
        kappa = expected[rnd - 1]
        assert strategy.kappa == kappa and metrics["gf-kappa"] == kappa
        q = flat(before) - flat(after)
        point = flat(after) + rho_g * q / q.norm()
        close(flat(strategy.global_point), point)
        assert float((flat(strategy.global_point) - flat(after)).norm()) == pytest.approx(rho_g, rel=1e-9)


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
