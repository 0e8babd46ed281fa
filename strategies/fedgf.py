"""FedGF (Lee & Yoon, ICML 2024): clients take their gradient between their own SAM point and a
global one, weighted by how far the clients drift (algorithms-family.md, section 10).

After each round the server measures the clients' divergence and builds a globally perturbed model:

    D_t     = mean_S ‖w_i − w_t‖                      (unweighted)
    window ← window + [D_t > τ_D], the last W entries;  κ_{t+1} = mean(window)
    w_{t+1} = Σ n_i w_i / Σ n_i                        (FedAvg)
    w̃_{t+1} = w_{t+1} + ρ_g · (w_t − w_{t+1}) / ‖w_t − w_{t+1}‖

and sends ``w̃`` (the ``global-point`` record) and ``κ`` (``gf-kappa``) with the next model; the
clients (``fedsam.optim.GlobalFlatSAM``, spec ``gf-sam``) evaluate each step's gradient at
``κ·w̃ + (1 − κ)·(w + ε)``.

**τ_D.** The published code leaves the threshold undefined, so this project decides it: given
(``threshold``), or measured (``threshold=None``): the median of ``D_t`` over the first
``calibration`` rounds, during which ``κ = 0`` (plain FedSAM). Once ``τ_D`` is known the window
holds the comparisons of every round so far (the last ``W``), so from then on ``κ_{t+1}`` is, as
the spec says, the fraction of the last ``min(W, t+1)`` rounds whose divergence exceeded ``τ_D``.
The median splits the early rounds evenly, so ``κ`` starts near ½ and follows the drift from
there: it rises when clients drift apart more than they did at the start, and falls as they
agree.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsam import wire
from fedsam.optim import FEDGF_RHO

from . import vectors
from .fedavg import ClientUpdate, FedAvg
from .swa import SWA


GF_CALIBRATION, GF_WINDOW = 10, 30  # τ_D's measured rounds (this project's rule); W of the reference


class FedGF(FedAvg):
    """FedAvg's server plus FedGF's global point and adaptive κ.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    rho : float (default: 0.05)
        The clients' SAM radius, sent when the train config names no optimizer.
    global_rho : float | None (default: None)
        ``ρ_g``, the global point's distance from ``w_{t+1}``; ``None``: the clients' ``ρ``.
    threshold : float | None (default: None)
        ``τ_D``; ``None`` measures it (the median of the first ``calibration`` rounds' ``D_t``);
        ``math.inf`` keeps ``κ = 0`` (FedSAM).
    calibration : int (default: 10)
        Rounds measured to set ``τ_D`` when it is not given.
    window : int (default: 30)
        ``W``, the rounds ``κ`` averages over.
    parameter_keys : list[str] | None (default: None)
        The trainable parameters (the global point covers these).
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 rho: float = FEDGF_RHO, global_rho: float | None = None, threshold: float | None = None,
                 calibration: int = GF_CALIBRATION, window: int = GF_WINDOW, parameter_keys: list[str] | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers,
                         relaxed_init=relaxed_init, swa=swa)
        if global_rho is not None and not (global_rho >= 0 and math.isfinite(global_rho)):
            raise ValueError(f"global_rho must be >= 0, got {global_rho}")
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if relaxed_init:
            raise ValueError("relaxed initialisation would move the clients off the point FedGF measures drift from")
        if calibration < 1 or window < 1:
            raise ValueError(f"calibration and window must be >= 1, got {calibration} and {window}")
        self.client_optimizer, self.rho, self.global_rho = "gf-sam", rho, global_rho
        self.threshold, self.calibration, self.window_size = threshold, calibration, window
        self.parameter_keys = parameter_keys
        self.divergences: list[float] = []  # D_t of every round so far
        self.kappa = 0.0
        self.global_point: vectors.Vector | None = None  # w̃
        self.round_rho = rho

    def tau(self) -> float | None:
        """``τ_D``: given, or the median of the calibration rounds once they are done."""
        if self.threshold is not None:
            return self.threshold
        if len(self.divergences) < self.calibration:
            return None
        return statistics.median(self.divergences[:self.calibration])

    def next_kappa(self) -> float:
        """The fraction of the last ``min(W, rounds so far)`` divergences above ``τ_D`` (0 before it is known)."""
        tau = self.tau()
        if tau is None:
            return 0.0
        recent = self.divergences[-self.window_size:]
        return sum(d > tau for d in recent) / len(recent)

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "divergences": list(self.divergences), "kappa": self.kappa,
                "global_point": vectors.vector_state(self.global_point)}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.divergences = [float(d) for d in state.get("divergences", [])]
        self.kappa = float(state.get("kappa", 0.0))
        self.global_point = vectors.vector_from_state(state.get("global_point"))

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)
        if out.get("optimizer", "gf-sam") != "gf-sam":
            raise ValueError(f"FedGF's clients use optimizer 'gf-sam', not {out['optimizer']!r}")
        out["optimizer"] = "gf-sam"
        out.setdefault("rho", self.rho)
        self.round_rho = float(out["rho"])
        out["gf-kappa"] = self.kappa
        return out

    def round_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        content = super().round_content(server_round, arrays, config)
        if self.global_point is not None and self.kappa > 0:
            content[wire.GLOBAL_POINT] = vectors.to_record(self.global_point, arrays)
        return content

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_usable(server_round, updates)
        if arrays is None:
            return arrays, metrics
        assert self.current_arrays is not None
        keys = list(vectors.floats(self.current_arrays, self.parameter_keys))
        self.divergences.append(sum(vectors.norm({k: u.delta[k] for k in keys}) for u in updates) / len(updates))
        self.kappa = self.next_kappa()
        before, after = vectors.floats(self.current_arrays, keys), vectors.floats(arrays, keys)
        step = vectors.sub(before, after)  # q = w_t − w_{t+1}
        size, radius = vectors.norm(step), self.global_rho if self.global_rho is not None else self.round_rho
        self.global_point = vectors.add(after, step, radius / size) if size > 0 else None
        if metrics is not None:
            metrics["gf-kappa"] = self.kappa
            metrics["gf-divergence"] = self.divergences[-1]
        return arrays, metrics
