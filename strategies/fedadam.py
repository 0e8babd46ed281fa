"""FedAdam (Reddi et al., ICLR 2021) as FL-Simulator runs it (algorithms-family.md, section 5).

FedAvg's clients; the server treats ``Δ̄`` as a pseudo-gradient, element-wise:

    m ← β1·m + (1 − β1)·Δ̄
    v ← β2·v + (1 − β2)·Δ̄²
    w_{t+1} = w_t + η_g · m / (√v + τ)

with no bias correction (the paper has none either) and ``m = v = 0`` at the start
(``v0="tau2"`` starts ``v`` at ``τ²``, the paper's suggestion). Flower's ``FedAdam`` is not
reused: it scales ``η_g`` by a bias correction, ``√(1 − β2^{t+1}) / (1 − β1^{t+1})``, which the
reference does not, so its first rounds take different steps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from . import vectors
from .fedavg import ClientUpdate, FedAvg
from .swa import SWA

V0 = ("zero", "tau2")
ADAM_BETA1, ADAM_BETA2, ADAM_TAU = 0.9, 0.99, 0.01  # FL-Simulator's train.py
FEDADAM_SERVER_LR = 0.1  # FL-Simulator's table (0.1 or 0.05); plain averaging's 1.0 diverges


class FedAdam(FedAvg):
    """FedAvg's clients, Adam on the server without bias correction.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    server_lr : float (default: 0.1)
        ``η_g``; FL-Simulator uses 0.1 or 0.05 (1.0, plain averaging's value, diverges here).
    beta1, beta2 : float (default: 0.9, 0.99)
        The moment decays, each in [0, 1).
    tau : float (default: 0.01)
        The adaptivity ``τ`` added to ``√v``; > 0.
    v0 : str (default: "zero")
        ``"zero"`` (FL-Simulator) or ``"tau2"`` (the paper: ``v`` starts at ``τ²``).
    parameter_keys : list[str] | None (default: None)
        The trainable parameters Adam steps; other float arrays (BatchNorm's statistics) are
        averaged. ``None``: every float array.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = FEDADAM_SERVER_LR, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 beta1: float = ADAM_BETA1, beta2: float = ADAM_BETA2, tau: float = ADAM_TAU, v0: str = "zero",
                 parameter_keys: list[str] | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"tau must be > 0, got {tau}")
        if v0 not in V0:
            raise ValueError(f"v0 must be one of {V0}, got {v0!r}")
        self.beta1, self.beta2, self.tau, self.v0 = beta1, beta2, tau, v0
        self.parameter_keys = parameter_keys
        self.first_moment: vectors.Vector | None = None  # m
        self.second_moment: vectors.Vector | None = None  # v

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "m": vectors.vector_state(self.first_moment),
                "v": vectors.vector_state(self.second_moment)}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.first_moment = vectors.vector_from_state(state.get("m"))
        self.second_moment = vectors.vector_from_state(state.get("v"))

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current_arrays is not None
        keys = list(vectors.floats(self.current_arrays, self.parameter_keys))
        mean = vectors.weighted_mean([{k: u.delta[k] for k in keys} for u in updates],
                                     [u.num_examples for u in updates])
        if self.first_moment is None or self.second_moment is None:
            self.first_moment = vectors.zeros_like(mean)
            start = self.tau ** 2 if self.v0 == "tau2" else 0.0
            self.second_moment = {k: np.full_like(v, start) for k, v in mean.items()}
        m = {k: self.beta1 * self.first_moment[k] + (1 - self.beta1) * mean[k] for k in mean}
        v = {k: self.beta2 * self.second_moment[k] + (1 - self.beta2) * np.square(mean[k]) for k in mean}
        self.first_moment, self.second_moment = m, v
        step = {k: self.server_lr * m[k] / (np.sqrt(v[k]) + self.tau) for k in mean}
        new = vectors.to_record(vectors.add(vectors.floats(self.current_arrays, keys), step), self.current_arrays)
        for k in self.current_arrays.keys():  # BatchNorm's statistics: averaged, not Adam-stepped
            if k not in new:
                new[k] = vectors.weighted_arrays(k, [u.reply.content["arrays"] for u in updates],
                                                 [u.num_examples for u in updates])
        metrics = self.train_metrics_aggr_fn([u.reply.content for u in updates], self.weighted_by_key)
        return ArrayRecord({k: new[k] for k in self.current_arrays.keys()}), metrics

    def correction_norm(self) -> float | None:
        """‖m / (√v + τ)‖, the server's step direction before ``η_g``."""
        if self.first_moment is None or self.second_moment is None:
            return None
        return vectors.norm({k: self.first_moment[k] / (np.sqrt(self.second_moment[k]) + self.tau)
                             for k in self.first_moment})
