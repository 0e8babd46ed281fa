"""SAM whose second pass is pulled towards a global point: FedGF's local optimizer (Lee & Yoon, ICML 2024).

The server sends a globally perturbed model ``w̃`` and a weight ``κ``; each client step takes its
gradient between ``w̃`` and its own SAM point::

    g = ∇L(w);   ε = ρ · g / (‖g‖₂ + 1e-12)
    p = κ·w̃ + (1 − κ)·(w + ε)            (p = w + ε without a global point, or with κ = 0)
    w ← base step from w with ∇L(p)

``w̃`` is an absolute point, not an offset: with ``κ = 1`` every step's gradient is taken at
``w̃``, wherever the local iterate is. ``load_global(None)`` (or ``κ = 0``) is SAM bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .sam import SAM


class GlobalFlatSAM(SAM):
    """SAM with FedGF's interpolation towards a global point ``w̃`` (non-adaptive)."""

    kappa = 0.0

    @torch.no_grad()
    def load_global(self, point: Iterable[torch.Tensor] | None, kappa: float = 0.0) -> None:
        """Set ``w̃`` (one tensor per parameter in ``param_groups`` order) and ``κ`` in [0, 1];
        ``None`` removes the global point."""
        if not 0 <= kappa <= 1:
            raise ValueError(f"kappa must be in [0, 1], got {kappa}")
        if point is None:
            self.kappa = 0.0
            return
        self._load("global_point", point, "global point")
        self.kappa = float(kappa)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """SAM's move to ``w + ε``, then towards ``w̃``: ``p = κ·w̃ + (1 − κ)·(w + ε)``."""
        super().first_step(zero_grad)
        if self.kappa == 0:
            return
        for group in self.param_groups:
            params = self._with_grad(group)
            if params:
                torch._foreach_mul_(params, 1.0 - self.kappa)
                torch._foreach_add_(params, self._buffers(params, "global_point"), alpha=self.kappa)
