"""MoFedSAM (Qu et al. ICML 2022): SAM clients that descend along a mix with the global momentum.

The client's descent direction is ``v = α · g_sam + (1 − α) · m_t``, ``w ← w − η_l · v``. The
server aggregates as FedAvg, then sets the momentum for the next round to the average update
direction, each client's update normalised by its own step count and the round's local lr:

    m_{t+1} = Σ_i n_i · (−Δ_i) / (K_i · η_l)  /  Σ_i n_i

and sends ``m_{t+1}`` (the ``"momentum"`` ArrayRecord) with the next round's model.
``m_0 = 0``: with no momentum yet, round 1 uses ``α = 1`` (a plain SAM step) rather than
scaling the first round's steps by α. MoFedSAM is FedCM (Xu et al. 2021) with SAM gradients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsam.optim import FEDERATED_RHO

from .fedsam import FedSAM


class MoFedSAM(FedSAM):
    """FedSAM plus global momentum.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers
        As in ``FedAvg``.
    client_optimizer, rho
        As in ``FedSAM``: SAM with ρ = 0.1 unless the train config names an optimizer.
    alpha : float (default: 0.1)
        The weight of the local SAM gradient in ``v = α g + (1 − α) m``; in (0, 1].
    parameter_keys : list[str] | None (default: None)
        The arrays that are trainable parameters (buffers such as BatchNorm statistics get no
        momentum); ``None`` means every floating-point array.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, client_optimizer: str = "sam", rho: float = FEDERATED_RHO,
                 alpha: float = 0.1, parameter_keys: list[str] | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers,
                         client_optimizer=client_optimizer, rho=rho)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.parameter_keys = parameter_keys
        self.momentum: ArrayRecord | None = None  # m_t; None until round 1 is aggregated

    def checkpoint_state(self) -> dict[str, Any]:
        return {"momentum": None if self.momentum is None else dict(self.momentum.to_torch_state_dict())}

    def restore_state(self, state: dict[str, Any]) -> None:
        momentum = state.get("momentum")
        self.momentum = None if momentum is None else ArrayRecord(dict(momentum))

    def round_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        config = self.round_config(server_round, config)  # FedSAM's: SAM unless told otherwise
        content = RecordDict({"arrays": arrays, "config": config})
        if self.momentum is None:
            config["momentum-alpha"] = 1.0
        else:
            config["momentum-alpha"] = self.alpha
            content["momentum"] = self.momentum
        return content

    def _keys(self, arrays: ArrayRecord) -> list[str]:
        if self.parameter_keys is not None:
            return list(self.parameter_keys)
        return [k for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating)]

    def next_momentum(self, replies: list[Message], lr: float) -> ArrayRecord:
        """``Σ_i n_i (w_t − w_i) / (K_i η_l) / Σ_i n_i`` over the parameter arrays."""
        assert self.current_arrays is not None
        keys = self._keys(self.current_arrays)
        start = {k: self.current_arrays[k].numpy().astype(np.float64) for k in keys}
        total = {k: np.zeros_like(v) for k, v in start.items()}
        weight_sum = 0.0
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()))
            n, steps = float(metrics["num-examples"]), float(metrics["num-steps"])
            arrays = reply.content["arrays"]
            for k in keys:
                total[k] += n * (start[k] - arrays[k].numpy()) / (steps * lr)
            weight_sum += n
        dtype = {k: self.current_arrays[k].numpy().dtype for k in keys}
        return ArrayRecord({k: Array(np.asarray((total[k] / weight_sum).astype(dtype[k]))) for k in keys})

    def aggregate_usable(self, server_round: int,
                         usable: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        momentum = self.next_momentum(usable, self.round_lr)
        arrays, metrics = super().aggregate_usable(server_round, usable)
        if arrays is not None:
            self.momentum = momentum
        return arrays, metrics
