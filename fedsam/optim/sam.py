"""SAM and ASAM: step to the approximate worst point in a ρ-ball, take the base step from there.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization" (ICLR 2021);
Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization" (ICML 2021). For one minibatch::

    g     = ∇L(w)
    ε     = ρ · T² g / (‖T g‖₂ + 1e-12)     T = 1 (SAM), or |w| + η on weight tensors (ASAM)
    g_sam = ∇L(w + ε)
    w     ← base step from w with g_sam
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .base import XI, PerturbThenDescend, check_rho


class SAM(PerturbThenDescend):
    """Sharpness-aware wrapper around any ``torch.optim`` optimizer; ``adaptive=True`` gives ASAM.

    ``rho``, ``adaptive`` and ``eta`` may differ per parameter group; ``‖T g‖₂`` is taken over all
    parameters together. ASAM's scale ``T = |w| + eta`` applies to the tensors the reference scales:
    every parameter named ``weight``, normalization weights included, while biases keep ``T = 1``.
    That needs the names, so pass ``model.named_parameters()`` (or ``asam_param_groups(model)``).
    Bare ``model.parameters()`` carry no names: ASAM then scales only the tensors with more than
    one dimension (convolution and linear weights), and says so once. A parameter group with
    ``"scaled": True`` or ``False`` decides it for its tensors.

    ``step(closure)`` runs both passes itself: the closure zeroes the gradients, runs forward and
    backward on the same minibatch, and returns the loss. (davda54/sam's ``step`` expects the
    first backward to be done before it is called; this one calls it.)
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        check_rho(rho)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if adaptive:
            params = _scaled_by_name(params)
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, eta=eta), base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move from ``w`` to ``w + ε`` using the gradients now in ``p.grad``."""
        pending = []
        for group, params, eps in self._gradients_aside():
            weights, scale = [], []
            scaled = group.get("scaled")
            if group["adaptive"]:
                weights = [i for i, p in enumerate(params) if (p.ndim > 1 if scaled is None else scaled)]
            if weights:
                scale = torch._foreach_abs([params[i] for i in weights])
                torch._foreach_add_(scale, group["eta"])
                torch._foreach_mul_([eps[i] for i in weights], scale)  # e_w = T g
            pending.append((group, params, eps, weights, scale))

        if not pending:
            return
        norm = self._joint_norm([eps for _, _, eps, _, _ in pending])
        for group, params, eps, weights, scale in pending:
            if weights:
                torch._foreach_mul_([eps[i] for i in weights], scale)  # e_w = T² g
            torch._foreach_mul_(eps, group["rho"] / (norm + XI))
            torch._foreach_add_(params, eps)
        if zero_grad:
            self.zero_grad()


#: Which tensors ASAM scales by ``|w| + η``: every parameter named ``weight`` (normalization weights
#: included, biases not), as the ASAM and FedASAM reference code does, or only the weight matrices
#: and kernels (``ndim > 1``), this package's choice before the reference was checked.
ASAM_SCOPES = ("reference", "matrices")
ASAM_SCOPE = ASAM_SCOPES[0]  # the default: the reference's


def asam_scaled(name: str, param: torch.Tensor, scope: str = ASAM_SCOPE) -> bool:
    """Whether ASAM scales this named parameter under ``scope`` (see ``ASAM_SCOPES``)."""
    if scope not in ASAM_SCOPES:
        raise ValueError(f"asam scope must be one of {ASAM_SCOPES}, got {scope!r}")
    return "weight" in name.rsplit(".", 1)[-1] if scope == "reference" else param.ndim > 1


def _scaled_by_name(params: Any) -> list[Any]:
    """Named parameters (``model.named_parameters()``, or groups of them without ``"scaled"``) split
    into ASAM's scaled and unscaled groups by the reference's rule; anything else as given, with a
    warning where 1-D tensors leave the choice to the ``ndim > 1`` fallback."""
    if isinstance(params, torch.Tensor):
        return params  # torch refuses a bare tensor in its own words
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out, unnamed_vectors = [], False
    for group in groups:
        members = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        named = bool(members) and all(isinstance(m, tuple) for m in members)
        if "scaled" in group or not named:
            unnamed_vectors |= "scaled" not in group and any(
                (m[1] if isinstance(m, tuple) else m).ndim <= 1 for m in members)
            out.append({**group, "params": members})
            continue
        for flag in (True, False):
            chosen = [(n, p) for n, p in members if asam_scaled(n, p) == flag]
            if chosen:
                out.append({**group, "params": chosen, "scaled": flag})
    if unnamed_vectors:
        warnings.warn("ASAM got parameters without names, so it scales only tensors with more than one "
                      "dimension; pass model.named_parameters() to scale normalization weights too, as the "
                      "reference does", stacklevel=3)
    return out if params else params


def asam_param_groups(model: torch.nn.Module, scope: str = ASAM_SCOPE) -> list[dict[str, Any]]:
    """``model``'s parameters in two groups, scaled by ASAM and not, for ``SAM(adaptive=True)``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if asam_scaled(n, p, scope) == flag], "scaled": flag}
              for flag in (True, False)]
    return [g for g in groups if g["params"]]
