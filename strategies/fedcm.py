"""FedCM (Xu et al. 2021): clients descend along a mix of their gradient and the global momentum.

Each local step uses ``d = α·g + (1 − α)·m_t`` (clipped, then weight decay added unscaled by α;
``fedsam.train``). The server aggregates as FedAvg, then sets the momentum of the next round to
the average update direction, normalised by the step count and the round's local lr:

    m_{t+1} = Σ_i n_i · (−Δ_i) / (K · η_t)  /  Σ_i n_i

with ``K = K_i`` (each client's own steps) or, as FL-Simulator does, one constant ``K̂ = E·n_0/b``
for every client (``fixed_steps``). ``m_0 = 0``: round 1 runs with ``d = α·g`` as in the reference
(``first_round_alpha="alpha"``), or as a plain step with ``α = 1`` (``"one"``, the default here,
so the first round is not slowed tenfold). MoFedSAM is FedCM with SAM gradients (``mofedsam.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsam import wire

from . import vectors
from .fedavg import ClientUpdate, FedAvg
from .swa import SWA

FIRST_ROUND = ("one", "alpha")


class FedCM(FedAvg):
    """FedAvg plus a global momentum mixed into every client step.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    alpha : float (default: 0.1)
        The weight of the local gradient in ``d = α g + (1 − α) m``; in (0, 1].
    parameter_keys : list[str] | None (default: None)
        The arrays that are trainable parameters (buffers such as BatchNorm statistics get no
        momentum); ``None`` means every floating-point array.
    first_round_alpha : str (default: "one")
        ``"one"``: round 1, which has no momentum yet, takes plain steps (α = 1). ``"alpha"``: it
        takes ``d = α·g`` against ``m_0 = 0``, as FL-Simulator does.
    fixed_steps : float | None (default: None)
        The normaliser ``K``: ``None`` is each client's own step count ``K_i``; a number is
        FL-Simulator's constant ``K̂ = E·n_0/b``. The mean over clients stays ``n_i``-weighted, as
        the model's is; FL-Simulator's is unweighted, the same number when the clients' sizes are
        equal, as in its setting (``dirichlet-equal``).
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None, alpha: float = 0.1, parameter_keys: list[str] | None = None,
                 first_round_alpha: str = "one", fixed_steps: float | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if first_round_alpha not in FIRST_ROUND:
            raise ValueError(f"first_round_alpha must be one of {FIRST_ROUND}, got {first_round_alpha!r}")
        if fixed_steps is not None and not fixed_steps > 0:
            raise ValueError(f"fixed_steps must be > 0, got {fixed_steps}")
        self.alpha = alpha
        self.parameter_keys = parameter_keys
        self.first_round_alpha = first_round_alpha
        self.fixed_steps = fixed_steps
        self.momentum: ArrayRecord | None = None  # m_t; None until round 1 is aggregated

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(),
                "momentum": None if self.momentum is None else dict(self.momentum.to_torch_state_dict())}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        momentum = state.get("momentum")
        self.momentum = None if momentum is None else ArrayRecord(dict(momentum))

    def round_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        content = super().round_content(server_round, arrays, config)
        momentum = self.momentum
        if momentum is None and self.first_round_alpha == "alpha":
            keys = self._keys(arrays)
            momentum = ArrayRecord({k: Array(arrays[k].numpy() * 0) for k in keys})  # m_0 = 0, mixed with α
        content["config"]["momentum-alpha"] = 1.0 if momentum is None else self.alpha
        if momentum is not None:
            content[wire.MOMENTUM] = momentum
        return content

    def _keys(self, arrays: ArrayRecord) -> list[str]:
        if self.parameter_keys is not None:
            return list(self.parameter_keys)
        return [k for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating)]

    def next_momentum(self, updates: list[ClientUpdate], lr: float) -> ArrayRecord:
        """``Σ_i n_i (−Δ_i) / (K η_t) / Σ_i n_i`` over the parameter arrays."""
        assert self.current_arrays is not None
        keys = self._keys(self.current_arrays)
        total = {k: np.zeros_like(updates[0].delta[k]) for k in keys}
        for u in updates:
            for k in keys:
                total[k] += u.num_examples * (-u.delta[k]) / ((self.fixed_steps or u.num_steps) * lr)
        weight_sum = sum(u.num_examples for u in updates)
        return vectors.to_record({k: v / weight_sum for k, v in total.items()}, self.current_arrays)

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        momentum = self.next_momentum(updates, self.round_lr)
        arrays, metrics = super().aggregate_usable(server_round, updates)
        if arrays is not None:
            self.momentum = momentum
        return arrays, metrics

    def correction_norm(self) -> float | None:
        """‖m_{t+1}‖, the momentum the next round mixes in."""
        return None if self.momentum is None else vectors.norm(vectors.floats(self.momentum))
