"""Independent re-implementations of the algorithms document, on one flat parameter vector.

Nothing here imports fedsam: each function transcribes a formula so the tests can compare the
library with it step for step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FlatLoss = Callable[[torch.Tensor], torch.Tensor]


def grad(loss: FlatLoss, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(w), w)
    return g


def sam_perturbation(g: torch.Tensor, w: torch.Tensor, rho: float, *, adaptive: bool = False,
                     eta: float = 0.0, weight_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ε = ρ T² g / (‖T g‖₂ + 1e-12), T = |w| + η on weight entries (ASAM) or 1 (SAM)."""
    if adaptive:
        t = torch.where(weight_mask, w.abs() + eta, torch.ones_like(w))
    else:
        t = torch.ones_like(w)
    return rho * t * t * g / ((t * g).norm() + 1e-12)


def fgsm_perturbation(loss: FlatLoss, w: torch.Tensor, rho: float, k: int, mu: float = 0.0) -> torch.Tensor:
    """k steps of ε_j = clip(ε_{j-1} + (ρ/k) sign(m_j), ±ρ), m_j = μ m_{j-1} + h_j/‖h_j‖₁."""
    eps = torch.zeros_like(w)
    m = torch.zeros_like(w)
    for _ in range(k):
        h = grad(loss, w + eps)
        m = mu * m + h / h.abs().sum()
        eps = (eps + (rho / k) * torch.sign(m)).clamp(-rho, rho)
    return eps


class SGDRef:
    """torch.optim.SGD's update: d = g + λw; b = d (first) or μb + d; w ← w − lr·b."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf: torch.Tensor | None = None

    def step(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        d = g + self.weight_decay * w
        if self.momentum:
            self.buf = d.clone() if self.buf is None else self.momentum * self.buf + d
            d = self.buf
        return w - self.lr * d
