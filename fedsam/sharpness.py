"""Sharpness of a model: the top eigenvalue of the Hessian of its loss, by the Lanczos method.

SAM's claim is that it finds flatter minima; ``λ_max(∇²L(w))`` is the usual number for how
sharp a minimum is. Each Lanczos step is one Hessian-vector product (a double backward pass over
the evaluation subset) and extends an orthonormal basis ``Q`` of the Krylov space; the largest
eigenvalue ``θ`` of the small tridiagonal ``T = QᵀHQ`` is the estimate. Unlike power iteration,
which finds the eigenvalue of largest *magnitude*, it converges to the largest *algebraic*
eigenvalue directly, so a negative curvature direction away from a minimum cannot hide the top of
the spectrum, and it needs far fewer products for the same accuracy. It stops when the Ritz pair's
residual ``‖H y − θ y‖`` is below ``tol·|θ|`` (then ``θ`` is within that of an eigenvalue) or after
``iters`` products; an estimate that ran out of products is returned as such
(``converged=False``, a value below ``λ_max``), never passed off as converged. The basis is
re-orthogonalised in full, which keeps ``iters`` model-sized vectors. The model is evaluated in
eval mode, so BatchNorm uses its running statistics and the loss is one fixed function of the
weights.
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
    converged: bool  # the Ritz residual fell below ``tol``; else ``value`` is where the cap stopped


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


def top_eigenvalue(losses: list[tuple[Loss, float]], params: list[torch.Tensor], iters: int = 20,
                   tol: float = 1e-3, seed: int = 0) -> Eigenvalue:
    """The largest (most positive) Hessian eigenvalue of ``Σ_k w_k L_k`` at ``params``, the
    Hessian-vector products it took, and whether it converged (Lanczos from a seeded direction)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    norm = float(torch.sqrt(_dot(v, v)))
    basis = [[x / norm for x in v]]
    alphas: list[float] = []
    betas: list[float] = []
    theta = 0.0
    for step in range(1, iters + 1):
        q = basis[-1]
        w = hessian_vector_product(losses, params, q)
        alphas.append(float(_dot(w, q)))
        for _ in range(2):  # full re-orthogonalisation, twice: float32 vectors lose orthogonality fast
            for b in basis:
                coefficient = _dot(w, b)
                torch._foreach_add_(w, b, alpha=-float(coefficient))
        beta = float(torch.sqrt(_dot(w, w)))
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        theta = float(values[-1])
        residual = beta * abs(float(vectors[-1, -1]))  # ‖H y − θ y‖ for the Ritz vector y = Q s
        if residual <= tol * max(abs(theta), 1e-12) or beta == 0.0:
            return Eigenvalue(theta, step, True)
        betas.append(beta)
        basis.append([x / beta for x in w])
    return Eigenvalue(theta, iters, False)


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
