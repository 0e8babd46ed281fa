"""Multi-step FGSM SAM: the inner maximisation over an L∞ ball, by k sign-gradient ascent steps.

Seed report 003 after Foret et al.'s p = ∞ case, with MI-FGSM momentum (Dong et al. 2018)::

    ε₀ = 0, m₀ = 0, a = ρ∞ / k
    for j = 1..k:
        h_j = ∇L(w + ε_{j-1})
        m_j = μ · m_{j-1} + h_j / ‖h_j‖₁
        ε_j = clip(ε_{j-1} + a · sign(m_j), -ρ∞, +ρ∞)
    g_sam = ∇L(w + ε_k);  restore w;  base step with g_sam

Scale: ``‖ρ∞ · sign(g)‖₂ = ρ∞ · √d``, so an L∞ radius comparable to SAM's L2 radius ``ρ`` is
``ρ / √d``. That is the default here: ``rho=None`` means ``0.05 / √d`` over the parameters given,
the same perturbation length as SAM's default. For Caldarola's CNN (d ≈ 0.8M) that is ≈ 5.6e-5;
for a CIFAR ResNet-18 (d ≈ 11.2M) ≈ 1.5e-5.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .base import XI, Closure, PerturbThenDescend, check_rho, require_closure

#: L2 length of the default perturbation: SAM's default ρ.
DEFAULT_L2_RADIUS = 0.05


def l2_equivalent_rho(num_parameters: int, l2_radius: float = DEFAULT_L2_RADIUS) -> float:
    """The L∞ radius whose sign perturbation has L2 length ``l2_radius`` in ``num_parameters`` dimensions."""
    return l2_radius / math.sqrt(num_parameters)


class FGSMSAM(PerturbThenDescend):
    """SAM with an L∞ neighbourhood found by ``steps`` sign-gradient ascent steps.

    Each ``step(closure)`` calls the closure ``steps + 1`` times on the same minibatch: ``steps``
    ascent passes, then the pass whose gradient the base optimizer uses. ``rho`` is the L∞ radius
    (per parameter group if you like); ``ascent_momentum`` is MI-FGSM's μ (0 = plain iterative FGSM).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float | None = None,
        steps: int = 1,
        ascent_momentum: float = 0.0,
        **base_kwargs: Any,
    ) -> None:
        if rho is not None:
            check_rho(rho)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not ascent_momentum >= 0:
            raise ValueError(f"ascent_momentum must be >= 0, got {ascent_momentum}")
        super().__init__(params, base_optimizer, dict(rho=rho), base_kwargs)
        self.steps = steps
        self.ascent_momentum = ascent_momentum
        num_parameters = sum(p.numel() for g in self.param_groups for p in g["params"])
        for group in self.param_groups:
            if group["rho"] is None:
                group["rho"] = l2_equivalent_rho(num_parameters)
        self._ascending: list[tuple[dict, list[torch.Tensor]]] = []

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Start the ascent at ``w`` (ε₀ = 0, m₀ = 0) and take its first step from ``p.grad``."""
        self._ascending = []
        for group in self.param_groups:
            params = self._with_grad(group)
            if not params:
                continue
            self._remember(params)
            torch._foreach_zero_(self._buffers(params, "eps"))
            if self.ascent_momentum > 0:
                torch._foreach_zero_(self._buffers(params, "ascent_m"))
            self._ascending.append((group, params))
        self.ascent_step(zero_grad)

    @torch.no_grad()
    def ascent_step(self, zero_grad: bool = False) -> None:
        """One more ascent step, from the gradients at the current ``w + ε``."""
        mu = self.ascent_momentum
        if mu > 0:
            l1 = sum(
                torch.stack(torch._foreach_norm([p.grad for p in params], 1)).sum()
                for _, params in self._ascending
            )
        for group, params in self._ascending:
            grads = [p.grad for p in params]
            if mu > 0:
                m = self._buffers(params, "ascent_m")
                torch._foreach_mul_(m, mu)
                torch._foreach_add_(m, torch._foreach_div(grads, l1 + XI))
                direction = torch._foreach_sign(m)
            else:
                direction = torch._foreach_sign(grads)  # sign(h / ‖h‖₁) = sign(h)
            rho = group["rho"]
            eps = self._buffers(params, "eps")
            torch._foreach_add_(eps, direction, alpha=rho / self.steps)
            torch._foreach_clamp_min_(eps, -rho)
            torch._foreach_clamp_max_(eps, rho)
            torch._foreach_copy_(params, self._buffers(params, "old_p"))
            torch._foreach_add_(params, eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """``steps + 1`` forward/backward passes on the closure's minibatch; returns the loss at ``w``."""
        closure = require_closure(closure, "FGSMSAM")
        loss = closure()
        self.first_step()
        for _ in range(self.steps - 1):
            closure()
            self.ascent_step()
        closure()
        self.second_step()
        return loss
