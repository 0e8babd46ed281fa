"""FedLESAM (algorithms-family.md, section 9): the fixed-perturbation client step against its
formula, the server's ε_i, and the three variants end to end.

Hooks: ρ = 0 ≡ FedAvg (one pass a step); a first participation takes plain steps; ε_i is the same
vector at every step of a round and ‖ε_i‖ = ρ; for a client also sampled in round t − 1 the
paper's form and the last-round form give the same ε.
"""

from __future__ import annotations


import pytest
import torch

from fedsam import wire
from fedsam.optim import FixedPerturbation, build
from strategies import FedLESAM, FedLESAMS
from tests import reference as ref
from tests.test_family_server import Scripted, flat, play, record_vector, start
from tests.test_optim import Problem


def test_a_step_takes_the_gradient_at_w_plus_epsilon_and_steps_from_w():
    prob = Problem(torch.float64)
    opt = FixedPerturbation(prob.model.parameters(), torch.optim.SGD, lr=0.1, weight_decay=1e-3)
    eps = [0.05 * torch.randn_like(p) for p in prob.model.parameters()]
    opt.load_perturbation(eps)
    flat_eps = torch.cat([e.reshape(-1) for e in eps])
    w = w0 = prob.flat()
    for _ in range(4):
        opt.step(prob.closure(opt))
        w = w - 0.1 * (ref.grad(prob.flat_loss, w + flat_eps) + 1e-3 * w)
    torch.testing.assert_close(prob.flat(), w, rtol=1e-12, atol=1e-12)
    assert prob.calls == 4  # one pass a step
    torch.testing.assert_close(prob.seen[0], w0 + flat_eps, rtol=0, atol=1e-15)  # the pass ran at w + ε


def test_no_perturbation_is_the_base_step_bit_for_bit():
    prob, twin = Problem(torch.float64), Problem(torch.float64)
    lesam = build("lesam", prob.model.parameters(), lr=0.1, weight_decay=1e-3)
    sgd = build("sgd", twin.model.parameters(), lr=0.1, weight_decay=1e-3)
    lesam.load_perturbation(None)
    for _ in range(3):
        lesam.step(prob.closure(lesam))
        sgd.step(twin.closure(sgd))
    assert torch.equal(prob.flat(), twin.flat())


def test_the_server_sends_rho_along_the_old_minus_the_new_global_model():
    rho, N = 0.3, 4
    clients = Scripted(N, seed=11)
    strategy = FedLESAM(N, 2, seed=4, rho=rho)
    received = {}
    for rnd, sampled, before, after, _ in play(strategy, clients, start(), 4):
        w_t = flat(before)
        for pid in sampled:
            content = clients.received[pid]
            assert content["config"]["optimizer"] == "lesam"
            sent = record_vector(content, wire.PERTURBATION, pid)
            if pid not in received:
                assert sent is None  # a first participation: plain steps
            else:
                delta = received[pid] - w_t
                torch.testing.assert_close(sent, rho * delta / delta.norm(), rtol=1e-12, atol=1e-12)
                assert float(sent.norm()) == pytest.approx(rho, rel=1e-12)
        received.update({pid: w_t for pid in sampled})


def test_the_last_round_form_equals_the_paper_form_for_a_client_sampled_the_round_before():
    paper, last = Scripted(3, seed=12), Scripted(3, seed=12)
    a = list(play(FedLESAM(3, 3, rho=0.2), paper, start(), 3))
    b = list(play(FedLESAM(3, 3, rho=0.2, source="last_round"), last, start(), 3))
    for pid in range(3):  # everyone is sampled every round
        x = record_vector(paper.received[pid], wire.PERTURBATION, pid)
        y = record_vector(last.received[pid], wire.PERTURBATION, pid)
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert len(a) == len(b) == 3


def test_fedlesam_s_scales_the_scaffold_correction():
    weighted, plain = Scripted(3, seed=13), Scripted(3, seed=13)
    list(play(FedLESAMS(3, 3, correction_weight=0.1), weighted, start(), 2))
    list(play(FedLESAMS(3, 3), plain, start(), 2))
    for pid in range(3):
        torch.testing.assert_close(record_vector(weighted.received[pid], wire.CORRECTION, pid),
                                   0.1 * record_vector(plain.received[pid], wire.CORRECTION, pid))
