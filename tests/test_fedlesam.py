"""FedLESAM (algorithms-family.md, section 9): the fixed-perturbation client step against its
formula, the server's ε_i, and the three variants end to end.

Hooks: ρ = 0 ≡ FedAvg (one pass a step); a first participation takes plain steps; ε_i is the same
vector at every step of a round and ‖ε_i‖ = ρ; for a client also sampled in round t − 1 the
paper's form and the last-round form give the same ε. Also: FedLESAM-D's server (ε_i and λh_i sent,
``w_{t+1} = mean_S(w_i) + mean_N(h_j)``), the -S and -D client steps against a transcription of
their formula, and ``w_i^old`` kept for a client whose reply failed.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsam import wire
from fedsam.client_app import on_device, round_correction
from fedsam.optim import FixedPerturbation, build
from fedsam.train import train_locally
from strategies import FedLESAM, FedLESAMD, FedLESAMS
from tests import reference as ref
from tests import test_family_client as fc
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
    """No ε loaded: the base SGD step bit for bit, at one forward/backward pass a step."""
    prob, twin = Problem(torch.float64), Problem(torch.float64)
    lesam = build("lesam", prob.model.parameters(), lr=0.1, weight_decay=1e-3)
    sgd = build("sgd", twin.model.parameters(), lr=0.1, weight_decay=1e-3)
    lesam.load_perturbation(None)
    for _ in range(3):
        lesam.step(prob.closure(lesam))
        sgd.step(twin.closure(sgd))
    assert torch.equal(prob.flat(), twin.flat())
    assert prob.calls == twin.calls == 3  # one pass a step, as SGD


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


def test_fedlesam_d_sends_epsilon_and_lambda_h_and_takes_feddyns_server_step():
    """FedLESAM-D's server: client i gets ε_i = ρ(w_i^old − w_t)/‖·‖ and λh_i (none at a first
    participation), anchor-pull = extra-weight-decay = λ; then h_i ← h_i + Δ_i and
    w_{t+1} = mean_S(w_i) + mean_N(h_j), both means unweighted."""
    N, k, lam, rho = 5, 3, 0.1, 0.3
    clients = Scripted(N, seed=14)
    strategy = FedLESAMD(N, k, seed=6, lam=lam, rho=rho)
    h, received, both = {}, {}, 0
    for rnd, sampled, before, after, _ in play(strategy, clients, start(), 4):
        w_t = flat(before)
        for pid in sampled:
            content = clients.received[pid]
            config = content["config"]
            assert config["optimizer"] == "lesam" and config["anchor-pull"] == lam
            assert config["extra-weight-decay"] == lam
            eps = record_vector(content, wire.PERTURBATION, pid)
            correction = record_vector(content, wire.CORRECTION, pid)
            if pid in received:
                delta = received[pid] - w_t
                torch.testing.assert_close(eps, rho * delta / delta.norm(), rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(correction, lam * h[pid], rtol=1e-12, atol=1e-12)
                both += 1
            else:
                assert eps is None and correction is None
        for pid in sampled:  # h_i ← h_i + Δ_i
            h[pid] = h.get(pid, torch.zeros(8, dtype=torch.float64)) + clients.deltas[pid]
        finals = [w_t + clients.deltas[pid] for pid in sampled]
        expected = sum(finals) / len(finals) + sum(h.values()) / N
        torch.testing.assert_close(flat(after), expected, rtol=1e-12, atol=1e-12)
        received.update({pid: w_t for pid in sampled})
    assert both >= 2  # some clients came back and got both vectors


LESAM_RHO = 0.1
_v = torch.randn(fc.SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
EPS = LESAM_RHO * _v / _v.norm()  # ε_i, ‖ε_i‖ = ρ
LAM_C = 0.1  # FedLESAM-S's λ_c, as the reference
VARIANTS = {  # config and records the strategy sends besides ε_i (FedLESAMS sends λ_c(c − c_i) as is)
    "S": ({}, {f"{wire.CORRECTION}.{fc.PID}": LAM_C * (fc.C_SERVER - fc.C_OWN)}),
    "D": (fc.DYN_CONFIG, fc.DYN_RECORDS),
}


def lesam_client(variant: str, clip: float, epochs: int = 2, batches=fc.BATCHES[:2]):
    """A FedLESAM-S/-D client round through the ClientApp's pieces (as ``fc.run_client``, with ε_i
    loaded); returns the final weights, ‖d‖ before each clip and the forward passes taken."""
    config, records = VARIANTS[variant]
    content = RecordDict({"config": ConfigRecord({"lr": fc.LR, "weight-decay": fc.WD, "server-round": 2,
                                                  "momentum": 0.0, "asam-scope": "reference", "fgsm-steps": 1,
                                                  "ascent-momentum": 0.0, "rounds": 2, "grad-clip": clip,
                                                  "optimizer": "lesam", **config}),
                          "arrays": ArrayRecord(fc.unflat(fc.W0)),
                          f"{wire.PERTURBATION}.{fc.PID}": ArrayRecord(fc.unflat(EPS)),
                          **{k: ArrayRecord(fc.unflat(v)) for k, v in records.items()}})
    config = content["config"]
    assert set(config.keys()) <= wire.TRAIN_CONFIG_KEYS
    start_state = content["arrays"].to_torch_state_dict()
    model = fc.make_model()
    model.load_state_dict(start_state)
    optimizer = build(str(config["optimizer"]), model.parameters(), **wire.optimizer_options(config, fc.PID))
    assert isinstance(optimizer, FixedPerturbation)
    eps = on_device(wire.client_record(content, wire.PERTURBATION, fc.PID), fc.CPU)
    optimizer.load_perturbation([eps[n] for n in fc.NAMES])
    passes, norms = [], []
    model.register_forward_hook(lambda *_: passes.append(1))
    clip_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        total = clip_norm(*args, **kwargs)
        norms.append(float(total))
        return total

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        train_locally(model, optimizer, batches, epochs, grad_clip=float(config["grad-clip"]),
                      momentum_alpha=wire.strategy_value(config, "momentum-alpha"),
                      correction=round_correction(content, fc.PID, start_state, fc.NAMES, fc.CPU),
                      direction_decay=wire.strategy_value(config, "direction-decay"))
    return fc.flat(model.parameters()), norms, len(passes)


def lesam_step_by_hand(variant: str, clip: float, epochs: int = 2, batches=fc.BATCHES[:2]) -> torch.Tensor:
    """Section 9 on section 0.2, transcribed: per step d = ∇L_B(w + ε_i) + λ_c(c − c_i) with ω = wd (-S),
    or d = ∇L_B(w + ε_i) + λ(h_i − w_{i,0}) with ω = wd + λ (-D); w ← w − η(clip_C(d) + ω·w)."""
    w0 = fc.W0
    w = w0.clone()
    for _ in range(epochs):
        for loss in fc.flat_losses(batches):
            g = ref.grad(loss, w + EPS)  # the only pass of the step, at w + ε_i (ε_i fixed all round)
            if variant == "S":
                d, omega = g + LAM_C * (fc.C_SERVER - fc.C_OWN), fc.WD
            else:
                d, omega = g + fc.LAM * (fc.H_I - w0), fc.WD + fc.LAM
            scale = min(1.0, clip / (float(d.norm()) + 1e-6))  # clip(d) = d · min(1, C / (‖d‖ + 1e-6))
            w = w - fc.LR * (d * scale + omega * w)
    return w


@pytest.mark.parametrize("variant", ["S", "D"])
def test_fedlesam_s_and_d_client_steps_match_the_formula(variant):
    """2 epochs × 2 minibatches, float64, clipping at C = 0.5 biting: train_locally with the lesam
    optimizer, ε_i and the variant's correction equals the hand transcription to 1e-12; 1 pass a step."""
    clip = 0.5
    got, norms, passes = lesam_client(variant, clip)
    assert len(norms) == 4 and any(n > clip for n in norms), norms  # clipping takes part
    assert passes == 4  # one forward/backward pass per step
    assert not torch.equal(got, fc.W0)
    torch.testing.assert_close(got, lesam_step_by_hand(variant, clip), rtol=1e-12, atol=1e-12)


def test_a_client_whose_reply_failed_still_perturbs_from_the_model_it_was_sent():
    """w_i^old is the model a client was last SENT, usable reply or not (section 9): client 2 fails
    in round 1 and still gets ε = ρ(w_1 − w_2)/‖·‖ in round 2; client 1 fails in round 2 and gets
    ε = ρ(w_2 − w_3)/‖·‖ in round 3 (not one from w_1, its last usable round)."""
    rho, N = 0.2, 3
    clients = Scripted(N, seed=15, fail=(2,))
    strategy = FedLESAM(N, N, rho=rho)
    models, eps = [], {}
    for rnd, sampled, before, _, _ in play(strategy, clients, start(), 3):
        assert sampled == list(range(N))
        assert [pid for pid, _ in strategy.round_report().failed] == sorted(clients.fail)
        models.append(flat(before))  # w_rnd, sent to every client
        eps[rnd] = {pid: record_vector(clients.received[pid], wire.PERTURBATION, pid) for pid in sampled}
        clients.fail = {1} if rnd == 1 else set()
    w1, w2, w3 = models

    def unit(delta):
        return rho * delta / delta.norm()

    assert all(e is None for e in eps[1].values())  # first participations: plain steps
    for rnd, expected in ((2, unit(w1 - w2)), (3, unit(w2 - w3))):  # failed or not: from the model last sent
        for pid in range(N):
            torch.testing.assert_close(eps[rnd][pid], expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unit(w1 - w3), unit(w2 - w3))  # so client 1's round-3 check can tell
