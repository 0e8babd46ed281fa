"""FedGloSS (Caldarola et al., CVPR 2025): SAM on the server, ADMM duals to keep clients consistent.

The server perturbs the global model along its last pseudo-gradient before sending it, and
applies the pseudo-gradient measured at that perturbed point to the unperturbed model
(algorithms-family.md, section 11; rounds are 1-based here, the spec's ``t`` is ``round − 1``):

    start of round t:  ε̃_t = ρ_s(t) · Δ̃_{t−1} / ‖Δ̃_{t−1}‖  (0 in the first round);  send w̃_t = w_t + ε̃_t
    client step:       d = g_sam − σ_i + (w − w̃_t)/β,   w ← w − η(d + wd·w)   (no clipping in the reference)
    end of round t:    Δ_i = w_i − w̃_t;   σ_i ← σ_i − Δ_i/β
                       σ ← σ − Σ Δ_i / (β·N·|S_t|)                  (the reference's; "paper": / (β·N))
                       Δ̃_t = −Σ n_i Δ_i / Σ n_i
                       w' = server SGD from w_t with gradient Δ̃_t (lr η_g, momentum μ_s)
                       w_{t+1} = w' − β·σ

The client's step is the shared path's (``fedsam.train``): ``b = −σ_i`` (the correction record),
``anchor-pull = 1/β`` (``−w̃/β``) and ``direction-decay = 1/β`` (``+w/β``). The perturbed model
travels as the message's ``arrays``; evaluation uses the unperturbed ``w_{t+1}``. ``σ_i`` lives in
the server's table. ρ warm-up over ``T_s`` rounds: the clients' ``ρ_l(t)`` and the server's
``ρ_s(t)`` both ramp linearly from ``ρ_0`` (the intended ramp; the reference's server list, built
from the client's last value, has effectively none).
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsam import wire

from . import vectors
from .fedavg import ClientUpdate, FedAvg
from .swa import SWA

GLOSS_BETA = 10.0  # CIFAR-10 (paper_experiments/cnn_cifar10.sh); CIFAR-100: 100
GLOSS_RHO = 0.15  # both ρ (server) and ρ_l (client) on CIFAR-10
GLOSS_RHO0 = 0.001  # where the warm-up starts (args.py)
DUALS = ("reference", "paper")


class FedGloSS(FedAvg):
    """Global SAM on the server with ADMM duals.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    server_lr : float (default: 1.0)
        ``η_g`` of the server's SGD step.
    server_momentum : float (default: 0.0)
        ``μ_s`` of the server's SGD step, in [0, 1).
    beta : float (default: 10.0)
        ADMM's ``β`` (> 0); ``math.inf`` turns the duals off (``1/β = 0``).
    rho : float (default: 0.15)
        The server's radius ``ρ`` (>= 0; 0 sends ``w_t`` unperturbed).
    client_rho : float (default: 0.15)
        The clients' SAM radius ``ρ_l``, sent as ``rho`` when the train config names no optimizer.
    warmup_rounds : int (default: 0)
        ``T_s``: both radii ramp linearly from ``rho0`` over this many rounds (0 or 1: no ramp).
    rho0 : float (default: 0.001)
        Where the ramp starts.
    dual : str (default: "reference")
        ``"reference"``: ``σ`` moves by ``Σ Δ_i/(β N |S_t|)``; ``"paper"``: by ``Σ Δ_i/(β N)``.
    parameter_keys : list[str] | None (default: None)
        The trainable parameters (the duals and the perturbation cover these).
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None,
                 server_momentum: float = 0.0, beta: float = GLOSS_BETA, rho: float = GLOSS_RHO,
                 client_rho: float = GLOSS_RHO, warmup_rounds: int = 0, rho0: float = GLOSS_RHO0,
                 dual: str = "reference", parameter_keys: list[str] | None = None) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers,
                         relaxed_init=relaxed_init, swa=swa)
        if not beta > 0:
            raise ValueError(f"beta must be > 0 (math.inf turns the duals off), got {beta}")
        if relaxed_init:
            raise ValueError("relaxed initialisation would replace the perturbed model FedGloSS sends")
        for name, value in (("rho", rho), ("client_rho", client_rho), ("rho0", rho0)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        if dual not in DUALS:
            raise ValueError(f"dual must be one of {DUALS}, got {dual!r}")
        self.beta, self.rho, self.client_rho, self.rho0 = beta, rho, client_rho, rho0
        self.warmup_rounds, self.dual, self.server_momentum = warmup_rounds, dual, server_momentum
        self.parameter_keys = parameter_keys
        self.client_duals = vectors.ClientStates()  # σ_i
        self.dual_mean: vectors.Vector | None = None  # σ; None means zero
        self.pseudo_gradient: vectors.Vector | None = None  # Δ̃ of the last round
        self.velocity: vectors.Vector | None = None  # the server SGD's momentum buffer

    def radius(self, server_round: int, final: float) -> float:
        """``ρ_0 + t·(final − ρ_0)/T_s`` for ``t = round − 1 ≤ T_s``, then ``final``."""
        t = server_round - 1
        if self.warmup_rounds <= 1 or t > self.warmup_rounds:
            return final
        return self.rho0 + t * (final - self.rho0) / self.warmup_rounds

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "client_duals": self.client_duals.state(),
                "dual_mean": vectors.vector_state(self.dual_mean),
                "pseudo_gradient": vectors.vector_state(self.pseudo_gradient),
                "velocity": vectors.vector_state(self.velocity)}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.client_duals.restore(state.get("client_duals", {}))
        self.dual_mean = vectors.vector_from_state(state.get("dual_mean"))
        self.pseudo_gradient = vectors.vector_from_state(state.get("pseudo_gradient"))
        self.velocity = vectors.vector_from_state(state.get("velocity"))

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)
        if "optimizer" not in out:
            out["optimizer"] = "sam"
        if out["optimizer"] == "sam":
            out["rho"] = self.radius(server_round, float(config.get("rho", self.client_rho)))
        if math.isfinite(self.beta):
            out["anchor-pull"] = 1.0 / self.beta
            out["direction-decay"] = 1.0 / self.beta
        return out

    def round_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """The perturbed ``w̃_t`` instead of ``w_t`` (from the second round, when ``ρ > 0``)."""
        content = super().round_content(server_round, arrays, config)
        radius = self.radius(server_round, self.rho)
        if self.pseudo_gradient is not None and radius > 0:
            size = vectors.norm(self.pseudo_gradient)
            if size > 0:
                now = vectors.floats(arrays)
                shift = vectors.scaled(self.pseudo_gradient, radius / size)
                perturbed = vectors.to_record({k: now[k] + shift[k] if k in shift else now[k] for k in now}, arrays)
                content["arrays"] = ArrayRecord({k: perturbed[k] if k in perturbed else arrays[k]
                                                 for k in arrays.keys()})
        return content

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        """``−σ_i``, once the client has a dual."""
        records = super().client_records(server_round, partition_id)
        if self.client_duals.has(partition_id) and math.isfinite(self.beta):
            assert self.current_arrays is not None
            sigma = self.client_duals.get(partition_id, vectors.floats(self.current_arrays, self.parameter_keys))
            records[wire.CORRECTION] = vectors.to_record(vectors.scaled(sigma, -1.0), self.current_arrays)
        return records

    def aggregate_usable(self, server_round: int,
                         updates: list[ClientUpdate]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current_arrays is not None
        params = vectors.floats(self.current_arrays, self.parameter_keys)
        deltas = [{k: u.delta[k] for k in params} for u in updates]
        if math.isfinite(self.beta):
            sigma = self.dual_mean if self.dual_mean is not None else vectors.zeros_like(params)
            sampled = len(self.sent_partitions())  # |S_t|: the sampled clients, failed ones included
            share = 1.0 / (self.sampler.num_clients * (sampled if self.dual == "reference" else 1))
            for u, delta in zip(updates, deltas):
                own = self.client_duals.get(u.partition_id, params)
                changed = self.client_duals.set(u.partition_id, vectors.add(own, delta, -1.0 / self.beta),
                                                self.current_arrays)
                sigma = vectors.add(sigma, changed, share)  # −Δ_i/(β·N·|S_t|), as σ_i stored it
            self.dual_mean = sigma
        pseudo = vectors.scaled(vectors.weighted_mean(deltas, [u.num_examples for u in updates]), -1.0)
        self.pseudo_gradient = pseudo
        if self.server_momentum:
            self.velocity = pseudo if self.velocity is None else vectors.add(
                vectors.scaled(self.velocity, self.server_momentum), pseudo)
            direction = self.velocity
        else:
            direction = pseudo
        new = vectors.add(params, direction, -self.server_lr)
        if self.dual_mean is not None and math.isfinite(self.beta):
            new = vectors.add(new, self.dual_mean, -self.beta)
        record = vectors.to_record(new, self.current_arrays)
        finals, weights = [u.reply.content["arrays"] for u in updates], [u.num_examples for u in updates]
        metrics = self.train_metrics_aggr_fn([u.reply.content for u in updates], self.weighted_by_key)
        return ArrayRecord({k: record[k] if k in record else vectors.weighted_arrays(k, finals, weights)
                            for k in self.current_arrays.keys()}), metrics

    def correction_norm(self) -> float | None:
        """‖σ‖, the server's dual."""
        return None if self.dual_mean is None else vectors.norm(self.dual_mean)

