"""SAM with a perturbation dual: FedSMOO's local optimizer (Sun et al., ICML 2023; "DRegSAM").

A client perturbs along its gradient *minus* what it and the server already know of the global
perturbation, so its local ascent stays consistent with the federation's. For one minibatch::

    g     = ∇L(w)
    ĝ     = g − u − s
    ε     = ρ · ĝ / (‖ĝ‖₂ + 1e-12)
    u     ← u + ε − s                 (the client's dual, kept across steps and rounds)
    g_sam = ∇L(w + ε)
    w     ← base step from w with g_sam

``u`` (the client's dual) and ``s`` (the server's global perturbation) start at zero; a
federation loads them each round with ``load_duals`` and reads ``u`` back with ``duals``. With
``u = s = 0`` and no history the first step is SAM's. ``ρ = 0`` is allowed here: ``ε = 0`` and
the step is the base step, which is FedSMOO's test hook against FedDyn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .base import XI, PerturbThenDescend, check_rho


class DualSAM(PerturbThenDescend):
    """SAM whose ascent direction is corrected by a dual ``u`` and a global perturbation ``s``.

    ``rho`` may differ per parameter group; ``‖ĝ‖₂`` is taken over all parameters together.
    """

    def __init__(self, params: Any, base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.1,
                 **base_kwargs: Any) -> None:
        check_rho(rho)
        super().__init__(params, base_optimizer, dict(rho=rho), base_kwargs)

    @torch.no_grad()
    def load_duals(self, dual: Iterable[torch.Tensor] | None = None,
                   shift: Iterable[torch.Tensor] | None = None) -> None:
        """Set ``u`` and ``s``, one tensor per parameter in ``param_groups`` order (``None``: zero)."""
        self._load("dual", dual, "dual")
        self._load("shift", shift, "shift")

    def duals(self) -> list[torch.Tensor]:
        """``u`` now, one tensor per parameter in ``param_groups`` order (zeros before any step)."""
        return self._buffers(self._all_params(), "dual")

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move from ``w`` to ``w + ε`` (ε from ``g − u − s``) and update ``u``."""
        pending = []
        for group, params, eps in self._gradients_aside():
            dual, shift = self._buffers(params, "dual"), self._buffers(params, "shift")
            torch._foreach_sub_(eps, dual)
            torch._foreach_sub_(eps, shift)  # ĝ = g − u − s
            pending.append((group, params, eps, dual, shift))
        if not pending:
            return
        norm = self._joint_norm([eps for _, _, eps, _, _ in pending])
        for group, params, eps, dual, shift in pending:
            torch._foreach_mul_(eps, group["rho"] / (norm + XI))
            torch._foreach_add_(dual, eps)
            torch._foreach_sub_(dual, shift)  # u ← u + ε − s
            torch._foreach_add_(params, eps)
        if zero_grad:
            self.zero_grad()
