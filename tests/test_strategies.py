"""Server strategies against the formulas, through a fake grid (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from strategies import ClientSampler, FedAvg, FedAvgM, FedSAM, MoFedSAM
from tests.inprocess import InProcessGrid

KEYS = ("w", "b")


class ScriptedClients:
    """A ClientApp whose replies we choose: client i returns w_t + Δ_i with n_i examples and K_i steps."""

    def __init__(self, num_clients, seed=0, fail=(), nan=()):
        rng = np.random.default_rng(seed)
        self.deltas = {pid: {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}
                       for pid in range(num_clients)}
        self.n = {pid: int(rng.integers(5, 50)) for pid in range(num_clients)}
        self.k = {pid: int(rng.integers(1, 9)) for pid in range(num_clients)}
        self.fail, self.nan = set(fail), set(nan)
        self.received: list[tuple[int, RecordDict]] = []
        self.app = ClientApp()
        self.app.train()(self.train)
        self.app.query("partition_id")(self.query)

    def query(self, msg, context):
        return Message(RecordDict({"partition": ConfigRecord({"partition-id": context.node_config["partition-id"]})}),
                       reply_to=msg)

    def train(self, msg, context):
        pid = context.node_config["partition-id"]
        self.received.append((pid, msg.content))
        if pid in self.fail:
            raise RuntimeError(f"client {pid} crashed")
        arrays = msg.content["arrays"]
        out = {k: arrays[k].numpy() + self.deltas[pid][k] for k in KEYS}
        if pid in self.nan:
            out["w"] = out["w"] * np.nan
        metrics = MetricRecord({"num-examples": self.n[pid], "num-steps": self.k[pid], "train-loss": float(pid),
                                "train-accuracy": 0.5, "seconds": 0.1})
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in out.items()}), "metrics": metrics}),
                       reply_to=msg)


def _start():
    rng = np.random.default_rng(42)
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}


def _record(values):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _one_round(strategy, clients, arrays, rnd=1, config=None, grid=None):
    grid = grid or InProcessGrid(clients.app, strategy.sampler.num_clients)
    messages = list(strategy.configure_train(rnd, _record(arrays), ConfigRecord(config or {"lr": 0.1}), grid))
    new, metrics = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
    return {k: new[k].numpy() for k in KEYS} if new is not None else None, metrics, grid


def _sampled(strategy, clients, rnd):
    return sorted(pid for pid, _ in clients.received[-strategy.sampler.per_round:]) if clients.received else []


@pytest.mark.parametrize("server_lr", [1.0, 0.5, 1.7])
def test_fedavg_is_the_example_weighted_mean_of_updates_scaled_by_the_server_lr(server_lr):
    clients = ScriptedClients(6)
    strategy = FedAvg(6, 4, seed=3, server_lr=server_lr)
    w0 = _start()
    new, metrics, _ = _one_round(strategy, clients, w0)
    chosen = sorted(pid for pid, _ in clients.received)
    assert chosen == ClientSampler(6, 4, 3).sample(1)
    n = np.array([clients.n[p] for p in chosen], dtype=np.float64)
    for k in KEYS:
        mean_delta = sum(n_i * clients.deltas[p][k].astype(np.float64) for n_i, p in zip(n, chosen)) / n.sum()
        np.testing.assert_allclose(new[k], w0[k] + server_lr * mean_delta, rtol=0, atol=1e-5)
    assert metrics["num-examples"] == n.sum() and metrics["num-clients"] == 4
    assert metrics["train-loss"] == pytest.approx(np.dot(n, chosen) / n.sum())


def test_local_lr_decays_per_round_and_the_round_is_sent():
    clients = ScriptedClients(3)
    strategy = FedAvg(3, 3, lr_decay=0.9)
    w = _start()
    grid = InProcessGrid(clients.app, 3)
    for rnd in (1, 2, 3):
        w, _, _ = _one_round(strategy, clients, w, rnd, {"lr": 0.2, "optimizer": "sgd"}, grid)
        config = clients.received[-1][1]["config"]
        assert config["server-round"] == rnd
        assert config["lr"] == pytest.approx(0.2 * 0.9 ** (rnd - 1))
        assert config["optimizer"] == "sgd"


def test_fedsam_sends_sam_with_rho_0_1_unless_told_otherwise():
    clients = ScriptedClients(2)
    _one_round(FedSAM(2, 2), clients, _start())
    config = clients.received[-1][1]["config"]
    assert config["optimizer"] == "sam" and config["rho"] == 0.1
    _one_round(FedSAM(2, 2), clients, _start(), config={"lr": 0.1, "optimizer": "asam"})
    assert clients.received[-1][1]["config"]["optimizer"] == "asam" and "rho" not in clients.received[-1][1]["config"]


def test_mofedsam_momentum_matches_the_formula_with_unequal_n_and_k():
    clients = ScriptedClients(5, seed=1)
    assert len(set(clients.n.values())) > 1 and len(set(clients.k.values())) > 1
    lr, decay, alpha = 0.05, 0.9, 0.2
    strategy = MoFedSAM(5, 3, seed=7, alpha=alpha, lr_decay=decay, server_lr=1.0)
    grid = InProcessGrid(clients.app, 5)
    w = _start()
    # round 1: no momentum yet, so α = 1 and no momentum record is sent
    w1, _, _ = _one_round(strategy, clients, w, 1, {"lr": lr}, grid)
    for _, content in clients.received:
        assert "momentum" not in content and content["config"]["momentum-alpha"] == 1.0
    chosen = sorted(pid for pid, _ in clients.received)
    n = {p: float(clients.n[p]) for p in chosen}
    expected = {k: sum(n[p] * (-clients.deltas[p][k].astype(np.float64)) / (clients.k[p] * lr) for p in chosen)
                / sum(n.values()) for k in KEYS}
    for k in KEYS:
        np.testing.assert_allclose(strategy.momentum[k].numpy(), expected[k], rtol=1e-5, atol=1e-6)
    # round 2: the momentum travels with the model, with α, and uses that round's lr (η_l · decay)
    clients.received.clear()
    _one_round(strategy, clients, w1, 2, {"lr": lr}, grid)
    for _, content in clients.received:
        assert content["config"]["momentum-alpha"] == alpha
        for k in KEYS:
            np.testing.assert_allclose(content["momentum"][k].numpy(), expected[k], rtol=1e-5, atol=1e-6)
    chosen2 = sorted(pid for pid, _ in clients.received)
    n2 = {p: float(clients.n[p]) for p in chosen2}
    expected2 = {k: sum(n2[p] * (-clients.deltas[p][k].astype(np.float64)) / (clients.k[p] * lr * decay)
                        for p in chosen2) / sum(n2.values()) for k in KEYS}
    for k in KEYS:
        np.testing.assert_allclose(strategy.momentum[k].numpy(), expected2[k], rtol=1e-5, atol=1e-6)


def test_mofedsam_momentum_covers_only_parameters():
    clients = ScriptedClients(2)
    strategy = MoFedSAM(2, 2, parameter_keys=["w"])
    _one_round(strategy, clients, _start())
    assert list(strategy.momentum.keys()) == ["w"]


def test_fedavgm_is_flowers_server_momentum():
    clients = ScriptedClients(4, seed=2)
    beta, eta = 0.9, 0.5
    strategy = FedAvgM(4, 4, server_lr=eta, server_momentum=beta)
    grid = InProcessGrid(clients.app, 4)
    w = _start()
    v = None
    for rnd in (1, 2):
        new, _, _ = _one_round(strategy, clients, w, rnd, {"lr": 0.1}, grid)
        n = np.array([clients.n[p] for p in range(4)], dtype=np.float64)
        for k in KEYS:
            mean_delta = sum(n[p] * clients.deltas[p][k] for p in range(4)) / n.sum()
            v_k = -mean_delta if v is None else beta * v[k] - mean_delta
            np.testing.assert_allclose(new[k], w[k] - eta * v_k, rtol=0, atol=1e-5)
        v = {k: (-(sum(n[p] * clients.deltas[p][k] for p in range(4)) / n.sum()) if v is None else
                 beta * v[k] - sum(n[p] * clients.deltas[p][k] for p in range(4)) / n.sum()) for k in KEYS}
        w = new


def test_sampling_is_reproducible_whatever_the_node_ids():
    picks = []
    for id_seed in (1, 2, 3):
        clients = ScriptedClients(10)
        strategy = FedAvg(10, 3, seed=5)
        grid = InProcessGrid(clients.app, 10, id_seed=id_seed)
        w = _start()
        rounds = []
        for rnd in (1, 2, 3):
            clients.received.clear()
            w, _, _ = _one_round(strategy, clients, w, rnd, grid=grid)
            rounds.append(sorted(pid for pid, _ in clients.received))
        picks.append(rounds)
    assert picks[0] == picks[1] == picks[2]
    assert len({tuple(r) for r in picks[0]}) > 1  # rounds differ from each other


def test_sampler_modes_statistics_and_seed():
    uniform = ClientSampler(20, 5, seed=1)
    assert all(len(uniform.sample(r)) == 5 == len(set(uniform.sample(r))) for r in range(1, 50))
    assert uniform.sample(3) == ClientSampler(20, 5, seed=1).sample(3)
    assert any(uniform.sample(r) != ClientSampler(20, 5, seed=2).sample(r) for r in range(1, 5))
    bernoulli = ClientSampler(100, 10, seed=0, mode="bernoulli")
    sizes = [len(bernoulli.sample(r)) for r in range(1, 401)]
    assert min(sizes) >= 1 and len(set(sizes)) > 3
    assert abs(np.mean(sizes) - 10) < 5 * 3 / np.sqrt(400)  # sd of Binomial(100, 0.1) is 3


def test_failed_and_non_finite_clients_are_left_out_and_recorded():
    clients = ScriptedClients(4, fail={1}, nan={2})
    strategy = FedAvg(4, 4)
    w0 = _start()
    new, metrics, _ = _one_round(strategy, clients, w0)
    reasons = dict(strategy.round_report().failed)
    assert set(reasons) == {1, 2} and "crashed" in reasons[1] and "non-finite" in reasons[2]
    good = [0, 3]
    n = np.array([clients.n[p] for p in good], dtype=np.float64)
    for k in KEYS:
        expected = w0[k] + sum(n_i * clients.deltas[p][k] for n_i, p in zip(n, good)) / n.sum()
        np.testing.assert_allclose(new[k], expected, rtol=0, atol=1e-5)
    assert metrics["num-clients"] == 2


def test_a_round_where_every_client_fails_aggregates_nothing():
    clients = ScriptedClients(2, fail={0, 1})
    new, metrics, _ = _one_round(FedAvg(2, 2), clients, _start())
    assert new is None and metrics is None


def test_clients_that_do_not_answer_the_partition_query_get_a_clear_error():
    app = ClientApp()

    @app.train()
    def train(msg, context):  # pragma: no cover
        raise AssertionError

    with pytest.raises(RuntimeError, match="query.partition_id"):
        _one_round(FedAvg(2, 2), type("C", (), {"app": app})(), _start(), grid=InProcessGrid(app, 2))
