"""Sharpness of a model: the top eigenvalue of the Hessian of its loss, by power iteration.

SAM's claim is that it finds flatter minima; ``λ_max(∇²L(w))`` is the usual number for how
sharp a minimum is. Each power-iteration step is one Hessian-vector product (a double backward
pass over the evaluation subset), ``v ← Hv / ‖Hv‖``, and ``λ ≈ vᵀHv`` (the Rayleigh quotient).
The iteration starts from a seeded random direction and stops when λ changes by less than
``tol`` (relative) or after ``iters`` products; an estimate that ran out of products is returned
as such (``converged=False``), never passed off as converged. The model is evaluated in eval mode,
so BatchNorm uses its running statistics and the loss is one fixed function of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fedsam.runtime import eval_batch_size

Loss = Callable[[], torch.Tensor]


class Eigenvalue(NamedTuple):
    value: float
    products: int  # Hessian-vector products spent
    converged: bool  # the last two estimates agreed within ``tol``; else ``value`` is where the cap stopped


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def hessian_vector_product(losses: Iterable[tuple[Loss, float]], params: list[torch.Tensor],
                           v: list[torch.Tensor]) -> list[torch.Tensor]:
    """``Σ_k w_k ∇²L_k · v`` for weighted loss terms (minibatches of one objective)."""
    out = [torch.zeros_like(p) for p in params]
    for loss_fn, weight in losses:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(_dot(list(grads), v), params)
        for acc, h in zip(out, hv):
            acc.add_(h.detach(), alpha=weight)
    return out


def _power_iteration(losses: list[tuple[Loss, float]], params: list[torch.Tensor], iters: int, tol: float,
                     seed: int, shift: float) -> Eigenvalue:
    """Dominant eigenvalue of ``H − shift·I``, by power iteration from a seeded direction."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eigenvalue = None
    for step in range(1, iters + 1):
        hv = hessian_vector_product(losses, params, v)
        if shift:
            hv = [h - shift * x for h, x in zip(hv, v)]
        new = float(_dot(hv, v))
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            return Eigenvalue(0.0, step, True)
        v = [x / norm for x in hv]
        if eigenvalue is not None and abs(new - eigenvalue) <= tol * max(abs(new), 1e-12):
            return Eigenvalue(new, step, True)
        eigenvalue = new
    return Eigenvalue(float(eigenvalue), iters, False)


def top_eigenvalue(losses: list[tuple[Loss, float]], params: list[torch.Tensor], iters: int = 20,
                   tol: float = 1e-3, seed: int = 0) -> Eigenvalue:
    """The largest (most positive) Hessian eigenvalue of ``Σ_k w_k L_k`` at ``params``, the
    Hessian-vector products it took, and whether it converged.

    Power iteration finds the eigenvalue of largest magnitude. Away from a minimum that can be a
    negative one; then a second pass on ``H − λ·I`` (whose dominant eigenvalue is
    ``λ_max − λ ≥ 0``) finds the top of the spectrum. A first pass that ran out of products has not
    settled which end of the spectrum dominates, so its sign decides nothing: it is returned
    unconverged.
    """
    first = _power_iteration(losses, params, iters, tol, seed, 0.0)
    if first.value >= 0 or not first.converged:
        return first
    shifted = _power_iteration(losses, params, iters, tol, seed + 1, first.value)
    return Eigenvalue(shifted.value + first.value, first.products + shifted.products, shifted.converged)


def model_sharpness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None,
                    iters: int = 20, tol: float = 1e-3, seed: int = 0) -> Eigenvalue:
    """``λ_max`` of the mean cross-entropy of ``model`` on (normalised, on-device) ``images``.
    ``batch_size`` only splits the sum. By default it is the test-set evaluation's on a CPU
    (``eval_batch_size``: faster there than 256, docs/performance.md), and 256 on a GPU, where each
    batch holds a double-backward graph."""
    if batch_size is None:
        batch_size = min(eval_batch_size(images.device), 256)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(images)
    losses = []
    for start in range(0, n, batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        losses.append((lambda x=x, y=y: F.cross_entropy(model(x), y), len(y) / n))
    try:
        return top_eigenvalue(losses, params, iters=iters, tol=tol, seed=seed)
    finally:
        model.train(was_training)


def evaluation_subset(num_samples: int, size: int, seed: int) -> torch.Tensor:
    """The fixed, seeded indices sharpness is measured on (the same every round of a run)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_samples, generator=generator)[:min(size, num_samples)]
