"""FedAvg with a server learning rate and a per-round local-lr decay (McMahan et al. 2017).

Round t: sample clients, send ``w_t`` and the round's config, clients train, then

    Δ̄ = Σ_i n_i (w_i − w_t) / Σ_i n_i,    w_{t+1} = w_t + η_g · Δ̄

(``η_g = 1`` is plain averaging). The local learning rate of round t is ``lr · lr_decay^(t−1)``.
Built on Flower's message-API ``FedAvg``, so any Flower ServerApp can drive it with
``strategy.start(...)``; what it adds is shared with FedAvgM through ``SeededRounds``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore import log

from fedsam import wire

from . import vectors
from .swa import SWA
from .sampling import ClientSampler, NodeSetupError, query_partition_ids, short_reason


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted train loss and accuracy; totals and extremes for the rest."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = np.array([float(m[weight_key]) for m in metrics])
    out = MetricRecord({weight_key: int(weights.sum()), "num-clients": len(metrics)})
    for name in ("train-loss", "train-accuracy"):
        if all(name in m for m in metrics):
            out[name] = float(np.dot(weights, [float(m[name]) for m in metrics]) / weights.sum())
    if all("num-steps" in m for m in metrics):
        out["num-steps"] = int(sum(int(m["num-steps"]) for m in metrics))
    if all("seconds" in m for m in metrics):
        out["client-seconds-max"] = float(max(float(m["seconds"]) for m in metrics))
    return out


@dataclass(frozen=True)
class ClientUpdate:
    """One usable client's round: who, its ``n_i`` and ``K_i``, ``Δ_i`` (float64) and its reply."""

    partition_id: int
    num_examples: float
    num_steps: float
    delta: vectors.Vector
    reply: Message

    def model_reply(self) -> Message:
        """The reply with only its model and metrics, as Flower's aggregation wants it (a client may
        also return its dual or optimizer state)."""
        content = self.reply.content
        return Message(RecordDict({"arrays": content["arrays"], "metrics": next(iter(content.metric_records.values()))}),
                       metadata=self.reply.metadata)


@dataclass(frozen=True)
class RoundReport:
    """What the strategy decided in its last round, for whoever drives it to record: the local lr
    it sent, every client it sent a message to, those that failed (an error, non-finite arrays)
    and those that never answered (their reason is the driver's: it knows its timeout)."""

    server_round: int
    lr: float | None
    sent: tuple[int, ...]
    failed: tuple[tuple[int, str], ...]
    silent: tuple[int, ...]


def _is_finite(record: ArrayRecord) -> bool:
    return all(np.isfinite(a.numpy()).all() for a in record.values() if np.issubdtype(np.dtype(a.dtype), np.inexact))


class SeededRounds:
    """Seeded client sampling over partition ids, the local-lr schedule, and replies in partition order.

    Flower's node ids change every run; partition ids do not. Aggregating in partition order (not
    arrival order) keeps floating-point sums identical from run to run.
    """

    def _init_rounds(self, num_clients: int, clients_per_round: int, seed: int, sampling: str,
                     lr_decay: float, query_timeout: float, workers: int | None = None,
                     relaxed_init: float = 0.0, swa: SWA | None = None) -> None:
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        if not (relaxed_init >= 0 and math.isfinite(relaxed_init)):
            raise ValueError(f"relaxed_init must be >= 0, got {relaxed_init}")
        self.relaxed_init = relaxed_init
        self.last_models = vectors.ClientStates()  # w_i^last, kept only with relaxed initialisation
        self.first_model: vectors.Vector | None = None  # w_0, the start of a client's first round after round 1
        self.starts: dict[int, vectors.Vector] = {}  # w_{i,0} of this round's relaxed clients
        self.swa = swa
        self.optimizer_states: dict[int, ArrayRecord] = {}  # what a client's optimizer keeps (Sparse SAM's mask)
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.cohort_work: list[float] | None = None  # see balance_cohorts
        self.sampler = ClientSampler(num_clients, clients_per_round, seed, sampling)
        self.lr_decay = lr_decay
        self.query_timeout = query_timeout
        self.node_of: dict[int, int] | None = None  # partition id -> node id, asked once
        self._partition_of_node: dict[int, int] = {}
        self.current_arrays: ArrayRecord | None = None
        self.sent_model: ArrayRecord | None = None
        self.server_round = 0
        self.round_lr: float | None = None
        self._failures: list[tuple[int, str]] = []  # (partition id, reason) of the last round
        self.sent: dict[int, list[int]] = {}  # node id -> the partitions its message of this round trains
        self._answered: set[int] = set()  # partitions of this round that replied, successfully or not

    def balance_cohorts(self, work: Sequence[float]) -> None:
        """Deal each round's clients to the ``workers`` cohorts by ``work`` (per partition id, e.g. its
        examples), so cohorts whose clients train one after another finish together, instead of
        round-robin by id (``fedsam.wire.split``). Which client trains in which cohort changes no
        result: each trains alone, from its own start with its own seed, and replies are aggregated
        in partition order."""
        if len(work) != self.sampler.num_clients:
            raise ValueError(f"work must have one entry per client ({self.sampler.num_clients}), got {len(work)}")
        self.cohort_work = [float(w) for w in work]

    def checkpoint_state(self) -> dict[str, Any]:
        """What must survive a restart besides the global model (sampling and the lr schedule are
        functions of the seed and the round, and node ids are asked for again): here, with relaxed
        initialisation, each client's last model and ``w_0``; a subclass adds its own state."""
        state: dict[str, Any] = {}
        if self.relaxed_init:
            state.update(last_models=self.last_models.state(), first_model=vectors.vector_state(self.first_model))
        if self.swa is not None:
            state["swa"] = self.swa.state()
        if self.optimizer_states:
            state["optimizer_states"] = {str(pid): dict(r.to_torch_state_dict())
                                         for pid, r in self.optimizer_states.items()}
        return state

    def restore_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``checkpoint_state``."""
        self.last_models.restore(state.get("last_models", {}))
        self.first_model = vectors.vector_from_state(state.get("first_model"))
        if self.swa is not None and "swa" in state:
            self.swa.restore(state["swa"])
        self.optimizer_states = {int(pid): ArrayRecord(dict(r)) for pid, r in state.get("optimizer_states", {}).items()}

    def evaluation_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model to evaluate and save: the SWA average once SWA has begun, else ``arrays``."""
        return self.swa.arrays() if self.swa is not None and self.swa.active else arrays

    def after_round(self, server_round: int, arrays: ArrayRecord | None) -> None:
        """Bookkeeping on the new global model every strategy shares (SWA's collection)."""
        if arrays is not None and self.swa is not None:
            self.swa.end_round(server_round, arrays)

    def relaxed_start(self, partition_id: int) -> vectors.Vector | None:
        """Relaxed initialisation (FL-Simulator's ``--use-RI``): client ``i`` starts from
        ``w_t + β·(w_t − w_i^last)``, with ``w_i^last = w_0`` before its first round; ``None`` (start
        at ``w_t``) when ``β = 0`` or in round 1, where ``w_t = w_0``."""
        assert self.current_arrays is not None
        if not self.relaxed_init or self.first_model is None:
            return None
        now = vectors.floats(self.current_arrays)
        last = self.last_models.get(partition_id, now) if self.last_models.has(partition_id) else self.first_model
        return {k: now[k] + self.relaxed_init * (now[k] - last[k]) for k in now}

    def local_lr(self, server_round: int, lr: float) -> float:
        """``lr · lr_decay^(t−1)``, then SWA's cyclic schedule once it has begun."""
        decayed = lr * self.lr_decay ** (server_round - 1)
        return self.swa.client_lr(server_round, decayed) if self.swa is not None else decayed

    def _nodes(self, grid: Grid) -> dict[int, int]:
        if self.node_of is None:
            wanted = self.sampler.num_clients
            node_ids = _wait_for_nodes(grid, wanted, self.query_timeout)
            self.node_of = query_partition_ids(grid, node_ids, self.query_timeout, wanted)
            self._partition_of_node = {node: pid for pid, node in self.node_of.items()}
            missing = sorted(set(range(wanted)) - set(self.node_of))
            if missing:
                raise NodeSetupError(f"no node holds partition ids {missing[:10]} (expected 0..{wanted - 1})")
        return self.node_of

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The config sent this round: the caller's, plus the round number and its local lr."""
        out = ConfigRecord(dict(config))
        out[wire.SERVER_ROUND] = server_round
        self.server_round = server_round
        if "lr" in config:
            self.round_lr = self.local_lr(server_round, float(config["lr"]))
            out["lr"] = self.round_lr
        return out

    def round_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """What every client of the round receives: the model, the config, shared vectors (``fedsam.wire``)."""
        return RecordDict({"arrays": arrays, "config": self.round_config(server_round, config)})

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        """The vectors only this client receives (SCAFFOLD's ``c − c_i``, FedDyn's ``λ h_i``): none here."""
        return {}

    def _with_client_records(self, content: RecordDict, server_round: int, cohort: list[int]) -> RecordDict:
        out = RecordDict(dict(content.items()))
        for pid in cohort:
            records = dict(self.client_records(server_round, pid))
            if pid in self.optimizer_states:
                records[wire.OPTIMIZER_STATE] = self.optimizer_states[pid]
            start = self.starts.get(pid)
            if start is not None:
                assert self.current_arrays is not None
                records["arrays"] = vectors.to_record(start, self.current_arrays)
                for k in self.current_arrays.keys():  # counters such as BatchNorm's num_batches_tracked
                    if k not in records["arrays"]:
                        records["arrays"][k] = self.current_arrays[k]
            for name, record in records.items():
                out[f"{name}.{pid}"] = record
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client; with ``workers``, one per cohort of clients (``fedsam.wire``)."""
        self.current_arrays = arrays
        if self.swa is not None:
            self.swa.begin_round(server_round, arrays)
        node_of = self._nodes(grid)
        sampled = self.sampler.sample(server_round)
        self.starts = {pid: start for pid in sampled if (start := self.relaxed_start(pid)) is not None}
        if self.relaxed_init and self.first_model is None:  # round 1 starts at w_t = w_0; later ones may not
            self.first_model = vectors.floats(arrays)
        content = self.round_content(server_round, arrays, config)
        self.sent_model = content["arrays"]  # w_t, or a model the strategy sends instead (FedGloSS's w̃_t)
        if self.workers is None:
            self.sent = {node_of[pid]: [pid] for pid in sampled}
            return [Message(self._with_client_records(content, server_round, [pid]), dst_node_id=node_of[pid],
                            message_type=MessageType.TRAIN) for pid in sampled]
        messages = []
        self.sent = {}
        for cohort in wire.split(sampled, self.workers, self.cohort_work):
            cohort_config = ConfigRecord(dict(content["config"]))
            cohort_config[wire.PARTITION_IDS] = cohort
            cohort_content = self._with_client_records(content, server_round, cohort)
            cohort_content["config"] = cohort_config
            self.sent[node_of[cohort[0]]] = cohort
            messages.append(Message(cohort_content, dst_node_id=node_of[cohort[0]], message_type=MessageType.TRAIN))
        return messages

    def sent_partitions(self) -> list[int]:
        """Every client sent a message this round, in partition order."""
        return sorted(pid for cohort in self.sent.values() for pid in cohort)

    def partition_id(self, node_id: int) -> int:
        """The partition node ``node_id`` holds (asked once, at the first round)."""
        return self._partition_of_node[node_id]

    def round_report(self) -> RoundReport:
        """The last round as the strategy saw it (after ``aggregate_train``)."""
        sent = self.sent_partitions()
        return RoundReport(self.server_round, self.round_lr, tuple(sent), tuple(self._failures),
                           tuple(pid for pid in sent if pid not in self._answered))

    def client_replies(self, replies: Iterable[Message]) -> list[tuple[int, Message]]:
        """``(partition id, reply)`` per client sent this round, in partition order: cohort replies
        unpacked; a cohort that failed as a whole, or answered without its clients' results,
        standing as a failure for each of its clients. Nothing outside what was sent is taken."""
        out = []
        for reply in replies:
            sent = self.sent.get(reply.metadata.src_node_id)
            if sent is None:
                continue  # no message of this round went to that node
            if wire.is_cohort_reply(reply):
                unpacked = wire.unpack(reply)
                out.extend((pid, unpacked[pid] if pid in unpacked else
                            wire.failure(reply, f"the cohort reply has no result for client {pid}")) for pid in sent)
            elif reply.has_error() or self.workers is None:
                out.extend((pid, reply) for pid in sent)
            else:  # a ClientApp that ignored the cohort: its one result is no particular client's
                out.extend((pid, wire.failure(reply, "the worker answered a cohort message without a cohort reply "
                                                     "(a ClientApp other than fedsam's?)")) for pid in sent)
        return sorted(out, key=lambda pair: pair[0])

    def usable_replies(self, replies: Iterable[Message]) -> list[tuple[int, Message]]:
        """``(partition id, reply)`` of the clients whose replies carry finite arrays, in partition
        order; the rest are the round's failures (``round_report``; a failed client's state stays as it was)."""
        usable, self._failures = [], []
        pairs = self.client_replies(replies)
        self._answered = {pid for pid, _ in pairs}
        for pid, reply in pairs:
            if reply.has_error():  # one line: Flower and Ray wrap the client's message in pages of detail
                self._failures.append((pid, short_reason(reply.error.reason) or f"error code {reply.error.code}"))
            elif not all(_is_finite(r) for r in reply.content.array_records.values()):
                self._failures.append((pid, "non-finite values in the returned arrays"))
            else:
                usable.append((pid, reply))
        for pid, reason in self._failures:
            log(WARNING, "client %d failed: %s", pid, reason)
        return usable

    def client_updates(self, usable: list[tuple[int, Message]]) -> list[ClientUpdate]:
        """Each usable client's ``Δ_i = w_i − w_{i,0}`` over the model's floating-point arrays, in
        float64 (``w_{i,0}`` is the model the client was sent: ``w_t``, unless relaxed initialisation
        moved it or the strategy sent another, as FedGloSS's ``w̃_t``). With relaxed
        initialisation each client's ``w_i`` is kept as its next round's ``w_i^last``."""
        assert self.current_arrays is not None
        global_start = vectors.floats(self.sent_model if self.sent_model is not None else self.current_arrays)
        out = []
        for pid, reply in usable:
            metrics = next(iter(reply.content.metric_records.values()))
            final = vectors.floats(reply.content["arrays"])
            start = self.starts.get(pid, global_start)
            out.append(ClientUpdate(pid, float(metrics["num-examples"]), float(metrics["num-steps"]),
                                    {k: final[k] - start[k] for k in start}, reply))
            if self.relaxed_init:
                self.last_models.set(pid, final, self.current_arrays)
            if wire.OPTIMIZER_STATE in reply.content:  # kept as it came, for the client's next round
                self.optimizer_states[pid] = reply.content[wire.OPTIMIZER_STATE]
        return out

    def round_diagnostics(self, updates: list[ClientUpdate]) -> dict[str, float]:
        """What a drift study reads each round: ``client-drift = mean_i ‖Δ_i − Δ̄‖ / ‖Δ̄‖`` (Δ̄
        example-weighted) and, for methods with one, the norm of their correction state."""
        out = {}
        if updates:
            mean = vectors.weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])
            scale = vectors.norm(mean)
            if scale > 0:
                out["client-drift"] = float(np.mean([vectors.norm(vectors.sub(u.delta, mean)) for u in updates]) / scale)
        correction = self.correction_norm()
        if correction is not None:
            out["correction-norm"] = correction
        return out

    def correction_norm(self) -> float | None:
        """‖the method's correction state‖ after the round (SCAFFOLD's c, FedDyn's h̄, ...); none here."""
        return None

    def apply_server_lr(self, server_lr: float, averaged: ArrayRecord) -> ArrayRecord:
        """``w_t + η_g (avg − w_t)``, in float64, cast back to each array's dtype."""
        if server_lr == 1.0 or self.current_arrays is None:
            return averaged
        out = ArrayRecord()
        for key, new in averaged.items():
            old = self.current_arrays[key].numpy()
            step = old.astype(np.float64) + server_lr * (new.numpy().astype(np.float64) - old)
            out[key] = Array(np.asarray(step.astype(old.dtype)))
        return out


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """All ``wanted`` nodes (SuperNodes may still be connecting); more than that is an error."""
    import time

    start = last_report = time.monotonic()
    while len(nodes := list(grid.get_node_ids())) < wanted:
        now = time.monotonic()
        if now - start > timeout:
            raise NodeSetupError(f"only {len(nodes)} of {wanted} nodes connected within {timeout:.0f} s")
        if now - last_report >= 10:
            log(WARNING, "waiting for nodes: %d of %d connected", len(nodes), wanted)
            last_report = now
        time.sleep(0.2)
    if len(nodes) > wanted:
        raise NodeSetupError(f"{len(nodes)} nodes are connected but the run has {wanted} clients "
                             "(one node per partition)")
    return nodes


class FedAvg(SeededRounds, FlowerFedAvg):
    """FedAvg with server lr ``η_g``, local-lr decay and seeded, partition-keyed sampling.

    ``num_clients`` is the number of partitions (SuperNodes); each round ``clients_per_round``
    of them train (``sampling="bernoulli"``: each with probability clients_per_round/num_clients).
    The train config's ``lr`` is the round-1 local lr.

    ``workers``: ``None`` sends one message per client (the Deployment Engine: one client per
    node). A number groups each round's clients into that many cohorts, one message each, so a
    simulation's workers each train several clients per call (``fedsam.wire``); every
    node of a simulation holds the whole dataset, so any node can train any partition.

    ``relaxed_init``: ``β_RI`` of relaxed initialisation (FL-Simulator's ``--use-RI``; 0 = off):
    each client starts from ``w_t + β·(w_t − w_i^last)``. ``swa``: server-side SWA
    (``strategies.swa.SWA``), whose average ``evaluation_arrays`` returns once it has begun.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None) -> None:
        if not (server_lr > 0 and math.isfinite(server_lr)):
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        super().__init__(fraction_train=clients_per_round / num_clients, fraction_evaluate=0.0,
                         min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=num_clients,
                         train_metrics_aggr_fn=aggregate_train_metrics)
        self._init_rounds(num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers,
                          relaxed_init, swa)
        self.server_lr = server_lr

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> %s: %d clients, %d per round (%s), seed %d, server lr %g, lr decay %g",
            type(self).__name__, self.sampler.num_clients, self.sampler.per_round, self.sampler.mode,
            self.sampler.seed, self.server_lr, self.lr_decay)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model and the round's metrics (train loss and accuracy, client drift,
        the correction's norm), or ``(None, None)`` when no client succeeded."""
        usable = self.usable_replies(replies)
        if not usable:
            return None, None
        updates = self.client_updates(usable)
        arrays, metrics = self.aggregate_usable(server_round, updates)
        if arrays is not None and metrics is not None:
            for name, value in self.round_diagnostics(updates).items():
                metrics[name] = value
        self.after_round(server_round, arrays)
        return arrays, metrics

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server update from the round's usable clients (``client_updates``): here FedAvg's
        ``w_t + η_g Δ̄``; a strategy with state updates it here too."""
        averaged, metrics = FlowerFedAvg.aggregate_train(self, server_round, [u.model_reply() for u in updates])
        if averaged is None:
            return None, metrics
        if self.starts:  # clients started apart (relaxed initialisation): step from w_t by the mean Δ_i
            assert self.current_arrays is not None
            mean = vectors.weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])
            stepped = vectors.add(vectors.floats(self.current_arrays), mean, self.server_lr)
            return ArrayRecord({k: vectors.to_record({k: stepped[k]}, self.current_arrays)[k] if k in stepped
                                else averaged[k] for k in self.current_arrays.keys()}), metrics
        return self.apply_server_lr(self.server_lr, averaged), metrics
