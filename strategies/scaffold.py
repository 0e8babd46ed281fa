"""SCAFFOLD, option II (Karimireddy et al., ICML 2020), and FedGAMMA (Dai et al., TNNLS 2023).

Each client corrects its steps by the difference of the server's and its own control variates:
``d = g + c − c_i`` (``fedsam.train``: ``b = c − c_i``, constant for the round). After the round,
with ``Δ_i = w_i − w_t`` and ``K`` the client's steps ``K_i`` (or FL-Simulator's constant ``K̂``):

    c_i⁺ = c_i − c − Δ_i / (K · η_t),    Δc_i = c_i⁺ − c_i
    w_{t+1} = w_t + η_g · Δ̄,             c ← c + (1/N) Σ_{i∈S_t} Δc_i

so ``c = mean_N(c_j)`` after every round. ``c`` and the ``c_i`` live on the server (a table over the
clients that took part, ``vectors.ClientStates``): the client only ever receives ``c − c_i``, and
the server knows ``Δ_i`` and ``K_i`` from the reply, so nothing extra travels up. A client that is
not sampled, or fails, keeps its ``c_i``. FedGAMMA is SCAFFOLD with SAM clients (ε from the
uncorrected gradient).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedsam import wire

from . import vectors
from .fedavg import ClientUpdate, FedAvg
from .fedsam import ClientDefaults
from .swa import SWA

#: FedGAMMA's radius in FL-Simulator's table (its train.py default of 0.1 is shared by all SAM methods).
FEDGAMMA_RHO = 0.01


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's control variates.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    parameter_keys : list[str] | None (default: None)
        The trainable parameters (the control variates cover only these); ``None`` means every
        floating-point array.
    fixed_steps : float | None (default: None)
        The normaliser ``K``: ``None`` is each client's own step count ``K_i``; a number is
        FL-Simulator's ``K̂ = E·n_0/b``.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None, parameter_keys: list[str] | None = None,
                 fixed_steps: float | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa)
        if fixed_steps is not None and not fixed_steps > 0:
            raise ValueError(f"fixed_steps must be > 0, got {fixed_steps}")
        self.parameter_keys = parameter_keys
        self.fixed_steps = fixed_steps
        self.control: vectors.Vector | None = None  # c, float64; None means zero (before round 1)
        self.client_controls = vectors.ClientStates()  # c_i

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "control": vectors.vector_state(self.control),
                "client_controls": self.client_controls.state()}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.control = vectors.vector_from_state(state.get("control"))
        self.client_controls.restore(state.get("client_controls", {}))

    def _params(self, arrays: ArrayRecord) -> vectors.Vector:
        return vectors.floats(arrays, self.parameter_keys)

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        """``c − c_i``; nothing while both are zero (round 1, or a client that never took part
        while ``c`` is still zero)."""
        assert self.current_arrays is not None
        if self.control is None and not self.client_controls.has(partition_id):
            return {}
        like = self._params(self.current_arrays)
        control = self.control if self.control is not None else vectors.zeros_like(like)
        own = self.client_controls.get(partition_id, like)
        return {wire.CORRECTION: vectors.to_record(vectors.sub(control, own), self.current_arrays)}

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_usable(server_round, updates)
        if arrays is None:
            return arrays, metrics
        assert self.current_arrays is not None and self.round_lr is not None
        like = self._params(self.current_arrays)
        control = self.control if self.control is not None else vectors.zeros_like(like)
        change = vectors.zeros_like(like)
        for u in updates:
            own = self.client_controls.get(u.partition_id, like)
            steps = self.fixed_steps or u.num_steps
            updated = {k: own[k] - control[k] - u.delta[k] / (steps * self.round_lr) for k in like}
            change = vectors.add(change, self.client_controls.set(u.partition_id, updated, self.current_arrays))
        self.control = vectors.add(control, change, 1.0 / self.sampler.num_clients)
        return arrays, metrics

    def correction_norm(self) -> float | None:
        """‖c‖, the server control variate."""
        return None if self.control is None else vectors.norm(self.control)


class FedGAMMA(ClientDefaults, Scaffold):
    """SCAFFOLD whose clients default to SAM with ρ = 0.01 (FL-Simulator's FedGAMMA setting).

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    parameter_keys, fixed_steps
        As in ``Scaffold``.
    client_optimizer, rho
        The optimizer spec and radius sent when the train config names no optimizer.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None, parameter_keys: list[str] | None = None,
                 fixed_steps: float | None = None, client_optimizer: str = "sam", rho: float = FEDGAMMA_RHO) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa,
                         parameter_keys=parameter_keys, fixed_steps=fixed_steps)
        self.client_optimizer, self.rho = client_optimizer, rho


