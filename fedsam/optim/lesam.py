"""A step at a perturbation fixed in advance: FedLESAM's local optimizer (Fan et al., ICML 2024).

SAM spends a second forward/backward pass finding its ascent direction. FedLESAM's clients are
given it instead, an estimate of where the *global* model is sharp, fixed for the whole round::

    g_ε = ∇L(w + ε)          ε given (``load_perturbation``); one pass per step
    w   ← base step from w with g_ε

With no perturbation loaded (``ε = 0``) every step is the base optimizer's own, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .base import Closure, PerturbThenDescend, require_closure


class FixedPerturbation(PerturbThenDescend):
    """Evaluates the gradient at ``w + ε`` for a given ``ε`` and steps from ``w``."""

    def __init__(self, params: Any, base_optimizer: Callable[..., torch.optim.Optimizer], **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer, {}, base_kwargs)
        self._loaded = False

    @torch.no_grad()
    def load_perturbation(self, perturbation: Iterable[torch.Tensor] | None) -> None:
        """Set ``ε``, one tensor per parameter in ``param_groups`` order (``None``: no perturbation)."""
        self._load("e_w", perturbation, "perturbation")
        self._loaded = perturbation is not None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One forward/backward pass at ``w + ε``; returns that loss."""
        closure = require_closure(closure, "FixedPerturbation")
        if not self._loaded:
            loss = closure()
            self.base_optimizer.step()
            return loss
        params = self._all_params()
        self._remember(params)
        torch._foreach_add_(params, self._buffers(params, "e_w"))
        loss = closure()
        self.second_step()
        return loss
