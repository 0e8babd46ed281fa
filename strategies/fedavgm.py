"""FedAvgM (Hsu et al. 2019): Flower's own server momentum, ``v ← β v − Δ̄``, ``w ← w − η_g v``,
with this package's seeded sampling and local-lr decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

from .fedavg import SeededRounds, aggregate_train_metrics
from .swa import SWA


class FedAvgM(SeededRounds, FlowerFedAvgM):
    """Flower's FedAvgM (``server_lr`` = η_g, ``server_momentum`` = β) with seeded sampling."""

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, server_momentum: float = 0.9, lr_decay: float = 1.0,
                 query_timeout: float = 600.0, workers: int | None = None, swa: SWA | None = None) -> None:
        super().__init__(server_learning_rate=server_lr, server_momentum=server_momentum,
                         fraction_train=clients_per_round / num_clients, fraction_evaluate=0.0,
                         min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=num_clients,
                         train_metrics_aggr_fn=aggregate_train_metrics)
        self._init_rounds(num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers,
                          swa=swa)

    def checkpoint_state(self) -> dict[str, Any]:
        """Flower's server momentum ``v`` (``momentum_vector``), one array per model array."""
        vector = self.momentum_vector
        return {**super().checkpoint_state(),
                "momentum_vector": None if vector is None else [torch.from_numpy(np.array(v)) for v in vector]}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        vector = state.get("momentum_vector")
        self.momentum_vector = None if vector is None else [t.numpy() for t in vector]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self.usable_replies(replies)
        if not usable:
            return None, None
        updates = self.client_updates(usable)
        arrays, metrics = super().aggregate_train(server_round, [u.model_reply() for u in updates])
        if arrays is not None and metrics is not None:
            for name, value in self.round_diagnostics(updates).items():
                metrics[name] = value
        self.after_round(server_round, arrays)
        return arrays, metrics

    def correction_norm(self) -> float | None:
        """‖v‖, the server velocity."""
        if self.momentum_vector is None:
            return None
        return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64))))
                                 for v in self.momentum_vector)))
