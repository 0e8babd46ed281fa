"""FedDyn (Acar et al., ICLR 2021) and the SAM methods on its server: FedSpeed (Sun et al., ICLR
2023) and FedSMOO (Sun et al., ICML 2023), in FL-Simulator's form (algorithms-family.md 4, 7, 8).

Client ``i`` keeps ``h_i`` (the sum of its past updates) and steps along

    d = g + λ·(h_i − w_{i,0}),   then clipped, then weight decay ``(wd + λ)·w``

(``fedsam.train``: the correction record is ``λ·h_i``, ``anchor-pull = λ`` subtracts ``λ·w_{i,0}``
and ``extra-weight-decay = λ``). After the round ``h_i ← h_i + Δ_i`` and the server, with plain
(unweighted) means and no server lr, takes

    w_{t+1} = mean_S(w_i) + mean_N(h_j)

``h_i`` lives in the server's table (``vectors.ClientStates``), ``h̄ = mean_N(h_j)`` is kept as it
changes (``(1/N)·Σ_{i∈S_t} Δ_i`` a round), so a round never reads the whole table. FedSpeed is
FedDyn with SAM clients. FedSMOO's clients use ``dual-sam`` (``fedsam.optim.DualSAM``): each
perturbs along ``g − u_i − s`` and updates its dual ``u_i``, which it returns; the server keeps
the ``u_i`` and sets ``s = ρ·ū / (‖ū‖ + ξ)`` from their mean over the round's clients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsam import wire
from fedsam.optim import FEDERATED_RHO, check_rho
from fedsam.optim.base import XI

from . import vectors
from .fedavg import ClientUpdate, FedAvg
from .fedsam import ClientDefaults
from .swa import SWA

#: FedDyn's λ (the paper's α) in FL-Simulator and in the FedSpeed and FedSMOO papers.
DYN_LAMBDA = 0.1


class FedDyn(FedAvg):
    """Dynamic regularisation: every client is pulled towards the global model by its own ``h_i``.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``. There is no server lr: the server step is fixed by the method.
    lam : float (default: 0.1)
        The regulariser's weight ``λ`` (the paper's ``α``); ``>= 0``. ``0`` removes the clients'
        pull, but not the server's ``mean_N(h_j)`` term, so it is not FedAvg.
    parameter_keys : list[str] | None (default: None)
        The trainable parameters (``h`` covers only these); ``None``: every floating-point array.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 lr_decay: float = 1.0, query_timeout: float = 600.0, workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 lam: float = DYN_LAMBDA, parameter_keys: list[str] | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, lr_decay=lr_decay,
                         query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa)
        if not (lam >= 0 and np.isfinite(lam)):
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam
        self.parameter_keys = parameter_keys
        self.drift = vectors.ClientStates()  # h_i
        self.mean_drift: vectors.Vector | None = None  # h̄ = mean_N(h_j), float64; None means zero

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "h": self.drift.state(),
                "h_mean": vectors.vector_state(self.mean_drift)}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.drift.restore(state.get("h", {}))
        self.mean_drift = vectors.vector_from_state(state.get("h_mean"))

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)
        out["anchor-pull"] = self.lam
        out["extra-weight-decay"] = self.lam
        return out

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        """``λ·h_i``, once the client has taken part (before that ``h_i = 0``)."""
        if not self.drift.has(partition_id) or self.lam == 0:
            return {}
        assert self.current_arrays is not None
        h = self.drift.get(partition_id, vectors.floats(self.current_arrays, self.parameter_keys))
        return {wire.CORRECTION: vectors.to_record(vectors.scaled(h, self.lam), self.current_arrays)}

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``h_i ← h_i + Δ_i``, ``h̄ ← h̄ + Σ Δ_i / N``, ``w_{t+1} = mean_S(w_i) + h̄``."""
        assert self.current_arrays is not None
        like = vectors.floats(self.current_arrays, self.parameter_keys)
        mean_drift = self.mean_drift if self.mean_drift is not None else vectors.zeros_like(like)
        for u in updates:
            own = vectors.add(self.drift.get(u.partition_id, like), {k: u.delta[k] for k in like})
            mean_drift = vectors.add(mean_drift, self.drift.set(u.partition_id, own, self.current_arrays),
                                     1.0 / self.sampler.num_clients)  # h̄ = mean_N(h_j), as stored
        self.mean_drift = mean_drift
        global_start = vectors.floats(self.current_arrays)
        finals = [vectors.add(self.starts.get(u.partition_id, global_start), u.delta) for u in updates]
        step = vectors.sub(vectors.mean(finals), global_start)  # mean_S(w_i) − w_t, each w_i from its own start
        for k, v in mean_drift.items():
            step[k] = step[k] + v
        new = vectors.to_record(vectors.add(global_start, step), self.current_arrays)
        first = updates[0].reply.content["arrays"]
        for k in self.current_arrays.keys():  # counters such as BatchNorm's num_batches_tracked
            if k not in new:
                new[k] = first[k]
        metrics = self.train_metrics_aggr_fn([u.reply.content for u in updates], self.weighted_by_key)
        return ArrayRecord({k: new[k] for k in self.current_arrays.keys()}), metrics

    def correction_norm(self) -> float | None:
        """‖h̄‖, the mean of the clients' ``h_j``."""
        return None if self.mean_drift is None else vectors.norm(self.mean_drift)


class FedSpeed(ClientDefaults, FedDyn):
    """FedDyn whose clients default to SAM (ρ = 0.1), FL-Simulator's FedSpeed (the paper's own code).

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers, relaxed_init, swa, lam,
    parameter_keys
        As in ``FedDyn``.
    client_optimizer, rho
        The optimizer spec and radius sent when the train config names no optimizer.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 lr_decay: float = 1.0, query_timeout: float = 600.0, workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 lam: float = DYN_LAMBDA, parameter_keys: list[str] | None = None, client_optimizer: str = "sam",
                 rho: float = FEDERATED_RHO) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, lr_decay=lr_decay,
                         query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa, lam=lam, parameter_keys=parameter_keys)
        self.client_optimizer, self.rho = client_optimizer, rho


class FedSMOO(FedDyn):
    """FedDyn with FedSMOO's dual SAM clients and the server's global perturbation ``s``.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers, relaxed_init, swa, lam,
    parameter_keys
        As in ``FedDyn``.
    rho : float (default: 0.1)
        The clients' radius, sent with ``optimizer = "dual-sam"``, and the norm of ``s``; a train
        config's own ``rho`` wins for both.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 lr_decay: float = 1.0, query_timeout: float = 600.0, workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 lam: float = DYN_LAMBDA, parameter_keys: list[str] | None = None, rho: float = FEDERATED_RHO) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, lr_decay=lr_decay,
                         query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa, lam=lam, parameter_keys=parameter_keys)
        check_rho(rho)
        self.rho = rho
        self.round_rho = rho
        self.duals = vectors.ClientStates()  # u_i
        self.shift: vectors.Vector | None = None  # s, float64; None means zero

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "u": self.duals.state(), "s": vectors.vector_state(self.shift)}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.duals.restore(state.get("u", {}))
        self.shift = vectors.vector_from_state(state.get("s"))

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)
        if out.get("optimizer", "dual-sam") != "dual-sam":
            raise ValueError(f"FedSMOO's clients use optimizer 'dual-sam', not {out['optimizer']!r}")
        out["optimizer"] = "dual-sam"
        out.setdefault("rho", self.rho)
        self.round_rho = float(out["rho"])
        return out

    def round_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        content = super().round_content(server_round, arrays, config)
        if self.shift is not None:
            content[wire.GLOBAL_PERTURBATION] = vectors.to_record(self.shift, arrays)
        return content

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        records = super().client_records(server_round, partition_id)
        if self.duals.has(partition_id):
            assert self.current_arrays is not None
            u = self.duals.get(partition_id, vectors.floats(self.current_arrays, self.parameter_keys))
            records[wire.DUAL] = vectors.to_record(u, self.current_arrays)
        return records

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedDyn's step, then ``u_i`` as returned and ``s = ρ·ū / (‖ū‖ + ξ)``."""
        missing = [u.partition_id for u in updates if wire.DUAL not in u.reply.content]
        if missing:  # checked before any state changes
            raise ValueError(f"client {missing[0]} returned no dual: FedSMOO's clients must use 'dual-sam'")
        arrays, metrics = super().aggregate_usable(server_round, updates)
        assert self.current_arrays is not None
        like = vectors.floats(self.current_arrays, self.parameter_keys)
        returned = []
        for u in updates:
            dual = vectors.floats(u.reply.content[wire.DUAL], list(like))
            self.duals.set(u.partition_id, dual, self.current_arrays)
            returned.append(dual)
        mean = vectors.mean(returned)
        self.shift = vectors.scaled(mean, self.round_rho / (vectors.norm(mean) + XI))
        return arrays, metrics

    def correction_norm(self) -> float | None:
        """‖h̄‖ (FedDyn's correction); ‖s‖ is ρ by construction."""
        return super().correction_norm()
