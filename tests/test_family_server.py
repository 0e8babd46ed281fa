"""The drift-correcting strategies' server rules against ``tests/reference_family.py``, through a
fake grid of scripted clients (no training, no Ray), in float64 over several rounds; and their
running means against their float32 client tables over a few hundred rounds.

Spec hooks checked here (algorithms-family.md):

- SCAFFOLD (3): ``c = mean_N(c_j)`` after every round; a client not sampled keeps its ``c_i``;
  what each client receives is ``c − c_i`` (nothing in round 1, when both are zero);
- FedCM (2): ``m_{t+1} = Σ n_i (−Δ_i)/(K_i η_t) / Σ n_i`` after any round (so ``m · K̂ · η_t = −Δ̄``
  with a constant ``K̂``); the reference's round 1 (α against ``m_0 = 0``);
- FedDyn (4): the first server step ``w_1 = w_0 + (1 + |S_0|/N) · mean_S(Δ_i)``;
  ``mean_N(h_j) = (1/N) Σ_τ Σ_{i∈S_τ} Δ_i``; clients receive ``λ·h_i``;
- FedSMOO (8): ``s = ρ·ū/‖ū‖`` so ``‖s‖ = ρ``; each client gets its own ``u_i`` back;
- FedAdam (5): the first step ``w_1 − w_0 = η_g Δ̄ / (|Δ̄| + 10τ)``;
- FedProx (1): the message carries the pull in the form ``prox_clip`` asks for;
- every strategy's state survives ``checkpoint_state`` / ``restore_state`` exactly;
- float32 models, 250 rounds, client states that nearly cancel: SCAFFOLD's ``c = mean_N(c_j)``
  (3: within 1e-6·‖c‖; checked to 1e-12), FedDyn's ``h̄ = mean_N(h_j)`` (4) and FedGloSS's
  ``σ = mean_N(σ_j)`` with ``dual = "paper"`` (11).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsam import wire
from strategies import FedAdam, FedAvg, FedCM, FedDyn, FedGF, FedGloSS, FedLESAM, FedProx, FedSMOO, Scaffold, vectors
from strategies.swa import SWA
from tests import reference_family as ref
from tests.inprocess import InProcessGrid

SHAPES = {"w": (3, 2), "b": (2,)}


def flat(arrays) -> torch.Tensor:
    return torch.cat([torch.as_tensor(np.asarray(arrays[k])).reshape(-1).double() for k in SHAPES])


def unflat(vector: torch.Tensor) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for k, shape in SHAPES.items():
        n = int(np.prod(shape))
        out[k] = vector[i:i + n].reshape(shape).numpy().copy()
        i += n
    return out


class Scripted:
    """Client ``i`` returns ``w_t + Δ_i`` (fresh each round) with ``n_i`` examples and ``K_i`` steps,
    and, when asked for FedSMOO, a dual of its own; it records everything it receives."""

    def __init__(self, num_clients: int, seed: int = 0, fail: tuple[int, ...] = ()) -> None:
        self.rng = np.random.default_rng(seed)
        self.n = {pid: int(self.rng.integers(5, 50)) for pid in range(num_clients)}
        self.k = {pid: int(self.rng.integers(2, 9)) for pid in range(num_clients)}
        self.fail = set(fail)
        self.received: dict[int, RecordDict] = {}
        self.deltas: dict[int, torch.Tensor] = {}
        self.duals: dict[int, torch.Tensor] = {}
        self.app = ClientApp()
        self.app.train()(self.train)
        self.app.query("partition_id")(self.query)

    def query(self, msg, context):
        return Message(RecordDict({"partition": ConfigRecord({"partition-id": context.node_config["partition-id"]})}),
                       reply_to=msg)

    def train(self, msg, context):
        pid = context.node_config["partition-id"]
        self.received[pid] = msg.content
        if pid in self.fail:
            raise RuntimeError(f"client {pid} crashed")
        delta = torch.as_tensor(self.rng.normal(size=8))
        self.deltas[pid] = delta
        own = wire.client_record(msg.content, "arrays", pid)  # its relaxed start, or w_t
        w = flat({k: own[k].numpy() for k in SHAPES})
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in unflat(w + delta).items()}),
            "metrics": MetricRecord({"num-examples": self.n[pid], "num-steps": self.k[pid], "train-loss": 1.0,
                                     "train-accuracy": 0.5, "seconds": 0.1}),
        })
        if msg.content["config"].get("optimizer") == "dual-sam":
            self.duals[pid] = torch.as_tensor(self.rng.normal(size=8))
            content[wire.DUAL] = ArrayRecord({k: Array(v) for k, v in unflat(self.duals[pid]).items()})
        return Message(content, reply_to=msg)


def start() -> dict[str, np.ndarray]:
    return unflat(torch.as_tensor(np.random.default_rng(42).normal(size=8)))


def play(strategy, clients: Scripted, w: dict, rounds: int, lr: float = 0.1, config: dict | None = None):
    """Yield, per round: the sampled partitions, the global model before and after."""
    grid = InProcessGrid(clients.app, strategy.sampler.num_clients)
    for rnd in range(1, rounds + 1):
        clients.received.clear()
        messages = list(strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in w.items()}),
                                                 ConfigRecord(config or {"lr": lr}), grid))
        new, metrics = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        sampled = sorted(clients.received)
        after = {k: new[k].numpy() for k in SHAPES}
        yield rnd, sampled, w, after, metrics
        w = after


def record_vector(content: RecordDict, name: str, pid: int) -> torch.Tensor | None:
    record = wire.client_record(content, name, pid)
    return None if record is None else flat({k: record[k].numpy() for k in SHAPES})


def close(a, b, tol=1e-10):
    torch.testing.assert_close(torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double(),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("fixed_steps", [None, 7.5])
def test_scaffold_server_and_control_variates_match_the_reference(fixed_steps):
    N, lr = 6, 0.1
    clients = Scripted(N, seed=1)
    strategy = Scaffold(N, 3, seed=5, fixed_steps=fixed_steps)
    c, table, stored = torch.zeros(8, dtype=torch.float64), {}, {}
    for rnd, sampled, before, after, metrics in play(strategy, clients, start(), 4, lr):
        for pid in sampled:  # what travelled down: c − c_i, and nothing while both are zero
            sent = record_vector(clients.received[pid], wire.CORRECTION, pid)
            expected = c - table.get(pid, torch.zeros(8, dtype=torch.float64))
            if rnd == 1:
                assert sent is None
            else:
                close(sent, expected)
        steps = [fixed_steps or clients.k[p] for p in sampled]
        w_next, c, table = ref.scaffold_server(flat(before), [clients.deltas[p] for p in sampled],
                                               [clients.n[p] for p in sampled], steps, lr, c, table, sampled, N)
        close(flat(after), w_next, 1e-6)  # the model is float64 here too, but Flower's mean runs its own way
        close(flat(strategy.control), c)
        for pid, vector in table.items():
            close(flat(strategy.client_controls.get(pid, strategy.control)), vector)
        control = flat(strategy.control)  # c = mean_N(c_j), on the strategy's own state
        mean_n = sum(flat(strategy.client_controls.get(p, strategy.control)) for p in range(N)) / N
        assert torch.linalg.norm(control - mean_n) <= 1e-12 * torch.linalg.norm(control)
        for pid, kept in stored.items():  # a client not sampled this round kept its c_i exactly
            if pid not in sampled:
                assert all(np.array_equal(strategy.client_controls.entries[pid][k], kept[k]) for k in SHAPES)
        stored = {pid: {k: v.copy() for k, v in entry.items()} for pid, entry in strategy.client_controls.entries.items()}
        assert metrics["correction-norm"] == pytest.approx(float(torch.linalg.norm(c)), rel=1e-12)


def test_a_failed_scaffold_client_keeps_its_control_variate_and_c_stays_the_mean():
    N = 4
    clients = Scripted(N, seed=2, fail=(1,))
    strategy = Scaffold(N, 4)
    for _ in play(strategy, clients, start(), 3):
        assert not strategy.client_controls.has(1)
        mean_n = sum(flat(strategy.client_controls.get(p, strategy.control)) for p in range(N)) / N
        close(flat(strategy.control), mean_n)


class NearlyCancelling:
    """Float32 clients near a stationary point: client ``i`` steers its server-side state
    (SCAFFOLD's ``c_i``, FedDyn's ``h_i``, FedGloSS's ``σ_i``) to ``g_i`` plus a little noise, read
    back from what it receives, where the ``g_i`` of all ``N`` clients nearly cancel. Each state is
    then hundreds of times the mean the server keeps of them, so a rounding error of the float32
    table that the mean does not follow shows up within a few hundred rounds."""

    def __init__(self, method: str, num_clients: int, lam: float = 0.1, beta: float = 1.0, seed: int = 0) -> None:
        self.method, self.lam, self.beta = method, lam, beta
        self.rng = np.random.default_rng(seed)
        g = 100.0 * self.rng.normal(size=(num_clients, 8))
        self.g = g - g.mean(axis=0) + 0.1 * self.rng.normal(size=8)  # ‖mean_N(g_j)‖ ≈ 1e-3 · ‖g_i‖
        self.k = {pid: int(self.rng.integers(2, 9)) for pid in range(num_clients)}
        self.received: dict[int, RecordDict] = {}
        self.app = ClientApp()
        self.app.train()(self.train)
        self.app.query("partition_id")(self.query)

    query = Scripted.query

    def train(self, msg, context):
        pid = context.node_config["partition-id"]
        content = self.received[pid] = msg.content
        w = flat({k: wire.client_record(content, "arrays", pid)[k].numpy() for k in SHAPES})
        got = record_vector(content, wire.CORRECTION, pid)
        got = torch.zeros(8, dtype=torch.float64) if got is None else got
        target = torch.as_tensor(self.g[pid] + 0.1 * self.rng.normal(size=8))
        if self.method == "scaffold":  # got = c − c_i; c_i⁺ = c_i − c − Δ/(Kη) = target
            delta = -self.k[pid] * float(content["config"]["lr"]) * (target + got)
        elif self.method == "feddyn":  # got = λ·h_i; h_i⁺ = h_i + Δ = target
            delta = target - got / self.lam
        else:  # FedGloSS: got = −σ_i; σ_i⁺ = σ_i − Δ/β = target
            delta = self.beta * (-got - target)
        arrays = {k: v.astype(np.float32) for k, v in unflat(w + delta).items()}
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10, "num-steps": self.k[pid], "train-loss": 1.0,
                                     "train-accuracy": 0.5, "seconds": 0.1}),
        }), reply_to=msg)


def float32_start() -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in start().items()}


LONG_RUN_ROUNDS = 250
LONG_RUN_TOL = 1e-12  # measured ≤ 3e-14 adding the stored changes; adding the unrounded ones: 3e-5 to 4e-5


def table_mean(table: vectors.ClientStates, N: int) -> torch.Tensor:
    """``mean_N`` over the stored float32 entries (a client never sampled counts as zero)."""
    assert all(entry[k].dtype == np.float32 for entry in table.entries.values() for k in SHAPES)
    return sum((flat(entry) for entry in table.entries.values()), torch.zeros(8, dtype=torch.float64)) / N


def long_run_gap(method: str, rounds: int = LONG_RUN_ROUNDS) -> tuple[float, float]:
    """Play ``rounds`` rounds; the worst ``‖mean − mean_N(table)‖ / ‖mean‖`` after any round, and
    the smallest ``‖state_i‖ / ‖mean‖`` at the end (how nearly the clients' states cancel)."""
    N = 20
    if method == "scaffold":
        strategy = Scaffold(N, 5, seed=3)
        state = lambda: (strategy.control, strategy.client_controls)  # noqa: E731
    elif method == "feddyn":
        strategy = FedDyn(N, 5, seed=3, lam=0.1)
        state = lambda: (strategy.mean_drift, strategy.drift)  # noqa: E731
    else:
        strategy = FedGloSS(N, 5, seed=3, dual="paper", beta=1.0)
        state = lambda: (strategy.dual_mean, strategy.client_duals)  # noqa: E731
    clients = NearlyCancelling(method.split("-")[0], N, seed=4)
    worst, seen = 0.0, set()
    for _, sampled, _, _, _ in play(strategy, clients, float32_start(), rounds, lr=0.1):
        seen.update(sampled)
        mean, table = state()
        kept = flat(mean)
        worst = max(worst, float(torch.linalg.norm(kept - table_mean(table, N)) / torch.linalg.norm(kept)))
    assert seen == set(range(N))  # every client took part
    smallest = min(float(torch.linalg.norm(flat(entry))) for entry in table.entries.values())
    return worst, smallest / float(torch.linalg.norm(kept))


@pytest.mark.parametrize("method", ["scaffold", "feddyn", "fedgloss-paper"])
def test_float32_running_means_stay_the_mean_of_the_stored_table_over_hundreds_of_rounds(method):
    """SCAFFOLD's ``c = mean_N(c_j)`` (3: within 1e-6·‖c‖ after every round), FedDyn's
    ``h̄ = mean_N(h_j)`` (4) and FedGloSS's paper-form ``σ = mean_N(σ_j)`` (11: σ_i and σ start at 0
    and σ moves by ``(1/N) Σ_S Δσ_i``), on the strategy's own state, with a float32 model, N = 20,
    5 clients a round, and client states far larger than their mean: the server's mean must
    follow the table as stored (rounded to float32), or it drifts from it by a rounding error
    every update (past 1e-6 relative within these rounds)."""
    worst, spread = long_run_gap(method)
    assert spread > 100  # the states do nearly cancel, which is what makes the drift visible
    assert worst <= LONG_RUN_TOL, worst


@pytest.mark.parametrize("fixed_steps", [None, 4.0])
def test_fedcm_momentum_is_the_weighted_mean_of_minus_delta_over_k_eta(fixed_steps):
    """``m_{t+1} = Σ n_i (−Δ_i) / (K_i η_t) / Σ n_i``: each client's update normalised by its own
    ``K_i`` (``fixed_steps = None``) or by the constant ``K̂`` (then ``m · K̂ · η_t = −Δ̄``)."""
    N, lr, decay = 5, 0.05, 0.9
    clients = Scripted(N, seed=3)
    strategy = FedCM(N, 3, seed=1, alpha=0.2, lr_decay=decay, fixed_steps=fixed_steps)
    for rnd, sampled, before, after, _ in play(strategy, clients, start(), 3, lr):
        eta = lr * decay ** (rnd - 1)
        n = [clients.n[p] for p in sampled]
        expected = ref.fedcm_momentum([clients.deltas[p] for p in sampled], n,
                                      [fixed_steps or clients.k[p] for p in sampled], eta)
        close(flat({k: strategy.momentum[k].numpy() for k in SHAPES}),
              expected)
        config = clients.received[sampled[0]]["config"]
        assert config["momentum-alpha"] == (1.0 if rnd == 1 else 0.2)  # the project's round 1: a plain step


def test_fedcm_reference_round_one_mixes_alpha_with_zero_momentum():
    clients = Scripted(3)
    strategy = FedCM(3, 3, alpha=0.1, first_round_alpha="alpha")
    next(play(strategy, clients, start(), 1))
    content = clients.received[0]
    assert content["config"]["momentum-alpha"] == 0.1
    assert all(not content[wire.MOMENTUM][k].numpy().any() for k in SHAPES)


def test_feddyn_first_step_and_the_running_mean_of_h():
    N, lam = 6, 0.1
    clients = Scripted(N, seed=4)
    strategy = FedDyn(N, 3, seed=2, lam=lam)
    table, history = {}, []
    for rnd, sampled, before, after, metrics in play(strategy, clients, start(), 4):
        deltas = [clients.deltas[p] for p in sampled]
        if rnd == 1:  # the spec's hook: w_1 = w_0 + (1 + |S|/N) · mean_S(Δ_i)
            close(flat(after), flat(before) + (1 + len(sampled) / N) * sum(deltas) / len(deltas), 1e-12)
        for pid in sampled:
            sent = record_vector(clients.received[pid], wire.CORRECTION, pid)
            if pid in table:
                close(sent, lam * table[pid])
            else:
                assert sent is None
            config = clients.received[pid]["config"]
            assert config["anchor-pull"] == lam and config["extra-weight-decay"] == lam
        w_next, table = ref.feddyn_server(flat(before), deltas, table, sampled, N)
        close(flat(after), w_next, 1e-12)
        history.extend(deltas)
        close(flat(strategy.mean_drift), sum(history) / N, 1e-12)


def test_fedsmoo_global_perturbation_has_norm_rho_and_duals_round_trip():
    N, rho = 5, 0.3
    clients = Scripted(N, seed=5)
    strategy = FedSMOO(N, 3, seed=3, rho=rho)
    table, s, duals = {}, None, {}
    for rnd, sampled, before, after, _ in play(strategy, clients, start(), 3):
        for pid in sampled:
            content = clients.received[pid]
            assert content["config"]["optimizer"] == "dual-sam" and content["config"]["rho"] == rho
            sent = record_vector(content, wire.DUAL, pid)
            assert (sent is None) == (pid not in duals)
            if sent is not None:
                close(sent, duals[pid])
            if s is None:
                assert wire.GLOBAL_PERTURBATION not in content
            else:
                close(record_vector(content, wire.GLOBAL_PERTURBATION, pid), s)
        returned = [clients.duals[p] for p in sampled]
        w_next, table, s = ref.fedsmoo_server(flat(before), [clients.deltas[p] for p in sampled], returned,
                                              table, sampled, N, rho)
        duals.update({p: clients.duals[p] for p in sampled})
        close(flat(after), w_next, 1e-12)
        close(flat(strategy.shift), s)
        assert float(torch.linalg.norm(s)) == pytest.approx(rho, rel=1e-9)


def test_fedadam_first_step_and_two_rounds_against_the_reference():
    N, eta, tau = 4, 0.1, 0.01
    clients = Scripted(N, seed=6)
    strategy = FedAdam(N, 4, server_lr=eta, tau=tau)
    m = v = torch.zeros(8, dtype=torch.float64)
    for rnd, sampled, before, after, _ in play(strategy, clients, start(), 2):
        n = [clients.n[p] for p in sampled]
        deltas = [clients.deltas[p] for p in sampled]
        mean = ref.weighted_mean(deltas, n)
        if rnd == 1:
            close(flat(after) - flat(before), eta * mean / (mean.abs() + 10 * tau), 1e-10)
        w_next, m, v = ref.fedadam_server(flat(before), deltas, n, m, v, eta, tau=tau)
        close(flat(after), w_next, 1e-12)


def test_fedadam_paper_v0_starts_v_at_tau_squared():
    clients = Scripted(2, seed=7)
    strategy = FedAdam(2, 2, v0="tau2", tau=0.05)
    _, sampled, before, after, _ = next(play(strategy, clients, start(), 1))
    mean = ref.weighted_mean([clients.deltas[p] for p in sampled], [clients.n[p] for p in sampled])
    v = 0.99 * 0.05 ** 2 + 0.01 * mean ** 2
    close(flat(after) - flat(before), 0.1 * 0.1 * mean / (v.sqrt() + 0.05), 1e-10)


@pytest.mark.parametrize("form,decay_key", [("reference", "extra-weight-decay"), ("paper", "direction-decay")])
def test_fedprox_sends_its_pull_in_the_form_asked_for(form, decay_key):
    clients = Scripted(2)
    next(play(FedProx(2, 2, mu=0.3, prox_clip=form), clients, start(), 1))
    config = clients.received[0]["config"]
    other = {"extra-weight-decay", "direction-decay"} - {decay_key}
    assert config["anchor-pull"] == 0.3 and config[decay_key] == 0.3 and not other & set(config.keys())
    next(play(FedProx(2, 2, mu=0.0), clients, start(), 1))  # μ = 0 sends nothing: FedAvg's message
    assert not {"anchor-pull", "extra-weight-decay", "direction-decay"} & set(clients.received[0]["config"].keys())


@pytest.mark.parametrize("make", [lambda: Scaffold(5, 2, seed=1, relaxed_init=0.2), lambda: FedDyn(5, 2, seed=1),
                                  lambda: FedAvg(5, 2, seed=1, swa=SWA(start=2)),
                                  lambda: FedLESAM(5, 2, seed=1), lambda: FedGF(5, 2, seed=1, calibration=1),
                                  lambda: FedSMOO(5, 2, seed=1), lambda: FedAdam(5, 2, seed=1),
                                  lambda: FedCM(5, 2, seed=1)])
def test_state_survives_a_checkpoint_exactly(make):
    """Three rounds straight equal two rounds, a checkpoint into a fresh strategy, and the third."""
    straight = make()
    last = list(play(straight, Scripted(5, seed=8), start(), 3))[-1][3]
    first, clients = make(), Scripted(5, seed=8)
    rounds = play(first, clients, start(), 3)
    next(rounds)
    _, _, _, w2, _ = next(rounds)
    resumed = make()
    resumed.restore_state(torch_roundtrip(first.checkpoint_state()))
    grid = InProcessGrid(clients.app, 5)
    messages = list(resumed.configure_train(3, ArrayRecord({k: Array(v) for k, v in w2.items()}),
                                            ConfigRecord({"lr": 0.1}), grid))
    new, _ = resumed.aggregate_train(3, grid.send_and_receive(messages))
    for k in SHAPES:
        assert np.array_equal(new[k].numpy(), last[k])


def torch_roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint goes."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make", [lambda beta: FedAvg(4, 2, seed=3, relaxed_init=beta, server_lr=0.7),
                                  lambda beta: FedDyn(4, 2, seed=3, relaxed_init=beta)])
def test_relaxed_initialisation_starts_each_client_from_its_relaxed_point(make):
    """0.6: ``w_{i,0} = w_t + β(w_t − w_i^last)``, ``w_i^last = w_0`` before a first round; round 1
    starts at ``w_t``; ``Δ_i`` is taken from the client's own start; β = 0 sends no start at all."""
    beta, N = 0.3, 4
    clients = Scripted(N, seed=9)
    strategy = make(beta)
    w0, last, table = None, {}, {}
    for rnd, sampled, before, after, _ in play(strategy, clients, start(), 4):
        w_t = flat(before)
        w0 = w_t if w0 is None else w0
        starts = {}
        for pid in sampled:
            sent = record_vector(clients.received[pid], "arrays", pid)
            if rnd == 1:
                assert f"arrays.{pid}" not in clients.received[pid]
                starts[pid] = w_t
            else:
                close(sent, w_t + beta * (w_t - last.get(pid, w0)))
                starts[pid] = sent
        deltas = [clients.deltas[p] for p in sampled]
        if isinstance(strategy, FedDyn):
            finals = [starts[p] + d for p, d in zip(sampled, deltas)]
            for p, d in zip(sampled, deltas):
                table[p] = table.get(p, torch.zeros(8, dtype=torch.float64)) + d
            close(flat(after), sum(finals) / len(finals) + sum(table.values()) / N, 1e-12)
        else:
            n = [clients.n[p] for p in sampled]
            close(flat(after), w_t + 0.7 * ref.weighted_mean(deltas, n), 1e-12)
        last.update({p: starts[p] + clients.deltas[p] for p in sampled})
    plain = Scripted(N, seed=9)
    next(play(make(0.0), plain, start(), 2))
    assert not any(k.startswith("arrays.") for content in plain.received.values() for k in content.keys())
