"""Independent transcription of `algorithms-family.md` sections 0-8, on one flat float64 vector.

Nothing here imports fedsam. Every local step is the FLS step (section 0.2): clip the assembled
direction d, then add weight decay ω·w (never clipped, never scaled by α). Weighted means use n_i;
the FedDyn family (FedDyn, FedSpeed, FedSMOO) uses unweighted means over S and over all N clients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tests.reference import FlatLoss, grad

XI = 1e-12  # the project's SAM constant ξ (algorithms.md)


def clip(d: Tensor, C: float | None) -> Tensor:
    """clip(d) = d · min(1, C / (‖d‖ + 1e-6)); C None or <= 0 means no clipping."""
    if C is None or C <= 0:
        return d
    return d * torch.clamp(C / (d.norm() + 1e-6), max=1.0)


def fls_step(w: Tensor, d: Tensor, lr: float, omega: float, C: float | None) -> Tensor:
    """w ← w − lr · (clip(d) + ω · w)."""
    return w - lr * (clip(d, C) + omega * w)


def sam_grad(loss: FlatLoss, w: Tensor, rho: float) -> Tensor:
    """g_sam = ∇L(w + ε), ε = ρ g / (‖g‖ + ξ), g = ∇L(w)."""
    g = grad(loss, w)
    return grad(loss, w + rho * g / (g.norm() + XI))


def client_round(method: str, losses: list[FlatLoss], w0: Tensor, *, lr: float, wd: float, C: float | None,
                 rho: float = 0.0, mu: float = 0.0, prox_clip: str = "reference", alpha: float = 1.0,
                 m: Tensor | None = None, c: Tensor | None = None, c_i: Tensor | None = None,
                 lam: float = 0.0, h_i: Tensor | None = None, u_i: Tensor | None = None,
                 s: Tensor | None = None) -> dict[str, Tensor]:
    """K_i = len(losses) FLS steps from w0 with the method's direction d and ω; Δ = w_K − w0."""
    def zero(x: Tensor | None) -> Tensor:
        return torch.zeros_like(w0) if x is None else x

    m, c, c_i, h_i, u, s = zero(m), zero(c), zero(c_i), zero(h_i), zero(u_i).clone(), zero(s)
    w = w0.clone()
    for loss in losses:
        omega = wd
        if method == "fedavg":
            d = grad(loss, w)
        elif method == "fedsam":
            d = sam_grad(loss, w, rho)
        elif method == "fedprox" and prox_clip == "reference":
            d, omega = grad(loss, w) - mu * w0, wd + mu          # d = g − μ·w0, ω = wd + μ
        elif method == "fedprox" and prox_clip == "paper":
            d = grad(loss, w) + mu * (w - w0)                    # d = g + μ(w − w0), ω = wd
        elif method == "fedcm":
            d = alpha * grad(loss, w) + (1 - alpha) * m
        elif method == "mofedsam":
            d = alpha * sam_grad(loss, w, rho) + (1 - alpha) * m
        elif method == "scaffold":
            d = grad(loss, w) + c - c_i
        elif method == "fedgamma":
            d = sam_grad(loss, w, rho) + c - c_i
        elif method == "feddyn":
            d, omega = grad(loss, w) + lam * (h_i - w0), wd + lam
        elif method == "fedspeed":
            d, omega = sam_grad(loss, w, rho) + lam * (h_i - w0), wd + lam
        elif method == "fedsmoo":
            g_hat = grad(loss, w) - u - s                        # ĝ = g − u_i − s
            eps = rho * g_hat / (g_hat.norm() + XI)
            u = u + eps - s                                      # u_i ← u_i + ε − s
            d, omega = grad(loss, w + eps) + lam * (h_i - w0), wd + lam
        else:
            raise ValueError(f"unknown method/prox_clip: {method}/{prox_clip}")
        w = fls_step(w, d, lr, omega, C)
    out = {"w": w, "delta": w - w0, "steps": torch.tensor(float(len(losses)), dtype=torch.float64)}
    if method == "fedsmoo":
        out["u"] = u
    return out


# --------------------------------------------------------------------------- servers

def weighted_mean(xs: list[Tensor], n: list[float]) -> Tensor:
    """Σ n_i x_i / Σ n_i."""
    return sum(ni * x for ni, x in zip(n, xs)) / sum(n)


def unweighted_mean(xs: list[Tensor]) -> Tensor:
    """(1/|xs|) Σ x_i."""
    return sum(xs) / len(xs)


def fedavg_server(w_t: Tensor, deltas: list[Tensor], n: list[float], server_lr: float = 1.0) -> Tensor:
    """w_{t+1} = w_t + η_g · Δ̄ (n_i-weighted)."""
    return w_t + server_lr * weighted_mean(deltas, n)


def fedcm_momentum(deltas: list[Tensor], n: list[float], steps: list[float], lr: float) -> Tensor:
    """m_{t+1} = Σ n_i (−Δ_i) / (K_i η_t) / Σ n_i."""
    return weighted_mean([-dl / (float(k) * lr) for dl, k in zip(deltas, steps)], n)


def scaffold_server(w_t: Tensor, deltas: list[Tensor], n: list[float], steps: list[float], lr: float,
                    c: Tensor, c_table: dict[int, Tensor], sampled: list[int], N: int,
                    server_lr: float = 1.0) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """c_i⁺ = c_i − c − Δ_i/(K_i η_t); c ← c + (1/N) Σ_S (c_i⁺ − c_i); w_{t+1} = w_t + η_g Δ̄."""
    table = dict(c_table)
    dc_sum = torch.zeros_like(w_t)
    for i, dl, k in zip(sampled, deltas, steps):
        ci = c_table.get(i, torch.zeros_like(w_t))
        ci_new = ci - c - dl / (float(k) * lr)                  # c = the round's starting c
        dc_sum = dc_sum + (ci_new - ci)
        table[i] = ci_new
    return fedavg_server(w_t, deltas, n, server_lr), c + dc_sum / N, table


def _dyn_update(w_t: Tensor, deltas: list[Tensor], h_table: dict[int, Tensor], sampled: list[int],
                N: int) -> tuple[Tensor, dict[int, Tensor]]:
    """h_i ← h_i + Δ_i; w_{t+1} = mean_S(w_t + Δ_i) + mean_N(h_j) (missing h_j = 0)."""
    table = dict(h_table)
    for i, dl in zip(sampled, deltas):
        table[i] = h_table.get(i, torch.zeros_like(w_t)) + dl
    h_mean = sum(table.values(), torch.zeros_like(w_t)) / N
    return unweighted_mean([w_t + dl for dl in deltas]) + h_mean, table


def feddyn_server(w_t: Tensor, deltas: list[Tensor], h_table: dict[int, Tensor], sampled: list[int],
                  N: int) -> tuple[Tensor, dict[int, Tensor]]:
    """h_i ← h_i + Δ_i; w_{t+1} = mean_S(w_i) + mean_N(h_j) (unweighted)."""
    return _dyn_update(w_t, deltas, h_table, sampled, N)


def fedsmoo_server(w_t: Tensor, deltas: list[Tensor], u_returned: list[Tensor], h_table: dict[int, Tensor],
                   sampled: list[int], N: int, rho: float) -> tuple[Tensor, dict[int, Tensor], Tensor]:
    """As FedDyn for w and h; ū = mean_S(u_i); s = ρ ū / (‖ū‖ + ξ)."""
    w_next, table = _dyn_update(w_t, deltas, h_table, sampled, N)
    u_bar = unweighted_mean(u_returned)
    return w_next, table, rho * u_bar / (u_bar.norm() + XI)


def fedadam_server(w_t: Tensor, deltas: list[Tensor], n: list[float], m: Tensor, v: Tensor, server_lr: float,
                   beta1: float = 0.9, beta2: float = 0.99, tau: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """m ← β1 m + (1−β1) Δ̄; v ← β2 v + (1−β2) Δ̄²; w_{t+1} = w_t + η_g m / (√v + τ); no bias correction."""
    d = weighted_mean(deltas, n)
    m = beta1 * m + (1 - beta1) * d
    v = beta2 * v + (1 - beta2) * d * d
    return w_t + server_lr * m / (v.sqrt() + tau), m, v
