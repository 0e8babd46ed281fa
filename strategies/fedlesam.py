"""FedLESAM (Fan et al., ICML 2024): a global perturbation each client already knows, one pass a step.

SAM's local ascent direction says where the *client's* loss is sharp. FedLESAM perturbs along an
estimate of where the *global* model is sharp instead: how the global model moved since the
client last took part. At the start of round ``t`` (algorithms-family.md, section 9):

    δ_i = w_i^old − w_t,    ε_i = ρ · δ_i / ‖δ_i‖     (ε_i = 0 at a first participation, or δ_i = 0)

where ``w_i^old`` is the global model client ``i`` received the last time it was sampled. The
client takes every step at ``w + ε_i`` (``fedsam.optim.FixedPerturbation``, spec ``lesam``), one
forward/backward pass instead of SAM's two. ``source="last_round"`` is the reference's intent:
``ε = −ρ · u_t / ‖u_t‖`` with ``u_t = w_t − w_{t−1}``, the same for every client (identical to the
paper's form for a client that was also sampled in round ``t − 1``). The published code's
per-tensor scalar shifts are not reproduced.

Variants: ``FedLESAM`` (FedAvg's server), ``FedLESAMS`` (SCAFFOLD's, with the correction scaled
by ``λ_c``) and ``FedLESAMD`` (FedDyn's). ``w_i^old`` lives in the server's table
(``vectors.ClientStates``): one model per client that has taken part.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsam import wire
from fedsam.optim import check_rho

from . import vectors
from .fedavg import ClientUpdate, FedAvg
from .feddyn import DYN_LAMBDA, FedDyn
from .scaffold import Scaffold
from .swa import SWA

LESAM_RHO = 0.1  # FedLESAM's train.py; its README says ρ needs tuning (0.5 in the FedLESAM-S example)
SOURCES = ("client", "last_round")
LESAM_CORRECTION = 1.0  # λ_c: SCAFFOLD's own weight (the reference's --lamb is 0.1)


class GlobalPerturbation:
    """What the three FedLESAM variants share: ``w_i^old``, ``ε_i`` on the wire, the ``lesam`` client."""

    parameter_keys: list[str] | None
    current_arrays: ArrayRecord | None

    def _init_perturbation(self, rho: float, source: str) -> None:
        check_rho(rho)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.rho, self.source = rho, source
        self.received = vectors.ClientStates()  # w_i^old
        self.previous_global: vectors.Vector | None = None  # w_{t−1}, for source="last_round"

    def _global_params(self) -> vectors.Vector:
        assert self.current_arrays is not None
        return vectors.floats(self.current_arrays, self.parameter_keys)

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)  # type: ignore[misc]
        if out.get("optimizer", "lesam") != "lesam":
            raise ValueError(f"FedLESAM's clients use optimizer 'lesam', not {out['optimizer']!r}")
        out["optimizer"] = "lesam"
        return out

    def _unit(self, direction: vectors.Vector) -> ArrayRecord | None:
        """``ρ · direction / ‖direction‖`` in the model's dtypes, or ``None`` for a zero direction."""
        assert self.current_arrays is not None
        size = vectors.norm(direction)
        if self.rho == 0 or size == 0:
            return None
        return vectors.to_record(vectors.scaled(direction, self.rho / size), self.current_arrays)

    def round_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        content = super().round_content(server_round, arrays, config)  # type: ignore[misc]
        if self.source == "last_round" and self.previous_global is not None:
            now = vectors.floats(arrays, self.parameter_keys)
            perturbation = self._unit(vectors.sub(self.previous_global, now))  # −u_t = w_{t−1} − w_t
            if perturbation is not None:
                content[wire.PERTURBATION] = perturbation
        return content

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        records = super().client_records(server_round, partition_id)  # type: ignore[misc]
        if self.source == "client" and self.received.has(partition_id):
            now = self._global_params()
            perturbation = self._unit(vectors.sub(self.received.get(partition_id, now), now))
            if perturbation is not None:
                records[wire.PERTURBATION] = perturbation
        return records

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_usable(server_round, updates)  # type: ignore[misc]
        if arrays is not None:
            assert self.current_arrays is not None
            now = self._global_params()
            for pid in self.sent_partitions():  # w_i^old ← w_t for every client sent w_t, failed ones too:
                self.received.set(pid, now, self.current_arrays)  # each did receive it (section 9)
            self.previous_global = now
        return arrays, metrics

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "received": self.received.state(),  # type: ignore[misc]
                "previous_global": vectors.vector_state(self.previous_global)}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)  # type: ignore[misc]
        self.received.restore(state.get("received", {}))
        self.previous_global = vectors.vector_from_state(state.get("previous_global"))


class FedLESAM(GlobalPerturbation, FedAvg):
    """FedAvg's server, FedLESAM's clients.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers,
    relaxed_init, swa
        As in ``FedAvg``.
    rho : float (default: 0.1)
        ``‖ε_i‖``; 0 sends no perturbation (FedAvg, at one pass a step).
    source : str (default: "client")
        ``"client"``: the paper's ``w_i^old − w_t``; ``"last_round"``: the last global change.
    parameter_keys : list[str] | None (default: None)
        The trainable parameters (the perturbation covers these); ``None``: every float array.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 rho: float = LESAM_RHO, source: str = "client", parameter_keys: list[str] | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers,
                         relaxed_init=relaxed_init, swa=swa)
        self.parameter_keys = parameter_keys
        self._init_perturbation(rho, source)


class FedLESAMS(GlobalPerturbation, Scaffold):
    """SCAFFOLD's server and control variates, FedLESAM's clients: ``d = ∇L(w + ε) + λ_c (c − c_i)``.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers,
    relaxed_init, swa, parameter_keys, fixed_steps
        As in ``Scaffold``.
    rho, source
        As in ``FedLESAM``.
    correction_weight : float (default: 1.0)
        ``λ_c``, the weight of ``c − c_i`` in the step: 1 is SCAFFOLD's; the reference uses 0.1.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 parameter_keys: list[str] | None = None, fixed_steps: float | None = None,
                 rho: float = LESAM_RHO, source: str = "client", correction_weight: float = LESAM_CORRECTION) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers,
                         relaxed_init=relaxed_init, swa=swa, parameter_keys=parameter_keys, fixed_steps=fixed_steps)
        if not (correction_weight >= 0 and math.isfinite(correction_weight)):
            raise ValueError(f"correction_weight must be >= 0, got {correction_weight}")
        self.correction_weight = correction_weight
        self._init_perturbation(rho, source)

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        records = super().client_records(server_round, partition_id)
        if wire.CORRECTION in records and self.correction_weight != 1.0:
            record = records[wire.CORRECTION]
            records[wire.CORRECTION] = ArrayRecord({k: Array(np.asarray(a.numpy() * self.correction_weight))
                                                    for k, a in record.items()})
        return records


class FedLESAMD(GlobalPerturbation, FedDyn):
    """FedDyn's client term and server, FedLESAM's clients.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers, relaxed_init,
    swa, lam, parameter_keys
        As in ``FedDyn``.
    rho, source
        As in ``FedLESAM``.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 lr_decay: float = 1.0, query_timeout: float = 600.0, workers: int | None = None,
                 relaxed_init: float = 0.0, swa: SWA | None = None, lam: float = DYN_LAMBDA,
                 parameter_keys: list[str] | None = None, rho: float = LESAM_RHO, source: str = "client") -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, lr_decay=lr_decay,
                         query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa, lam=lam,
                         parameter_keys=parameter_keys)
        self._init_perturbation(rho, source)
