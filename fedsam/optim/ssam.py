"""Sparse SAM: SAM whose perturbation touches only the entries a binary mask selects.

Mi et al., "Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach"
(NeurIPS 2022); algorithms-family.md, section 13. With a mask ``m`` (1 = perturbed) and sparsity
``s`` (the fraction of the ``P`` entries *not* perturbed), for one minibatch::

    g     = ∇L(w)
    ε     = ρ · (m ⊙ g) / (‖g‖₂ + 1e-12)        norm="full": the reference's, so ‖ε‖ ≤ ρ
    ε     = ρ · (m ⊙ g) / (‖m ⊙ g‖₂ + 1e-12)    norm="masked": renormalised, ‖ε‖ = ρ
    g_sam = ∇L(w + ε)
    w     ← base step from w with g_sam

The mask comes from one of two rules:

- ``mode="fisher"`` (SSAM-F): 1 on the ``⌊P·(1 − s)⌋`` entries with the largest empirical Fisher
  score ``Σ_j (∇ℓ_j)²`` over ``num_samples`` single examples, ranked over all parameters jointly.
  It starts all zeros (the first steps are plain base steps) and is refreshed *after* the update
  of the first step of every epoch ``e`` with ``e mod update_freq = 0``. A refresh costs
  ``num_samples`` extra single-example forward/backward passes.
- ``mode="dynamic"`` (SSAM-D): starts with ``P − ⌈P·s⌉`` entries drawn uniformly at random and is
  refreshed *inside* the first step of such an epoch, after ``ε`` (old mask) is applied and before
  the second pass, at no extra pass: of the perturbed entries the ``⌊(P − P·s)·(1 − r)⌋`` with the
  largest death score stay, and of the entries that were 0 before the refresh the
  ``⌊min((P − P·s)·r, P·s)⌋`` with the largest growth score join, where
  ``r(e) = r₀·(1 + cos(π·e/E_total))/2``.

Counts are exact: ``s`` is read as the decimal it prints as (``0.8`` is 4/5, so ``P = 10`` keeps 2
entries, not the 1 that ``⌊10·(1 − 0.8)⌋`` gives in floats, as in the reference), and ``r`` is
rounded to 12 decimals so that ``cos(π/2) ≈ 6e-17`` does not cost an entry.

Federated use (a project choice; the paper has no federated version): the mask is client state
kept between rounds (``mask()`` / ``load_mask``), refreshes count the client's own cumulative
local epochs (``set_epoch``), SSAM-F scores use the client's own examples (``fisher_loss``) and
SSAM-D's drop rate follows the global round, ``r(t) = r₀·(1 + cos(π·t/T))/2`` (``set_epoch(...,
drop_rate=opt.drop_rate_at(t))`` with ``total_epochs=T``). The schedule lives on the host (a
Python step counter and a data-dependent top-k), so a step cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import torch

from .base import XI, Closure, PerturbThenDescend, check_rho, require_closure

SSAM_MODES = ("fisher", "dynamic")
SSAM_NORMS = ("full", "masked")
SSAM_SCORES = ("gradient", "weight", "random")


def _positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _exact(value: float) -> Fraction:
    """The decimal ``value`` prints as, exactly: what the user meant by ``0.3``."""
    return Fraction(repr(float(value)))


# -- the rule as plain functions: the optimizer below and the batched cohort (fedsam.cohort) both
# -- call these, so the counts, the schedule and the top-k have one definition. Masks and scores
# -- are flat over all parameters along the last dimension; leading dimensions are clients.


def perturbed_count(size: int, sparsity: float) -> int:
    """The entries SSAM-F's refresh perturbs, ``⌊P·(1 − s)⌋``, which are as many as SSAM-D's initial
    random mask holds, ``P − ⌈P·s⌉`` (the spec's two formulas are one number, ``P`` being whole)."""
    return math.floor(size * (1 - _exact(sparsity)))


def dynamic_counts(size: int, sparsity: float, drop_rate: float) -> tuple[int, int]:
    """SSAM-D's refresh: at most ``⌊(P − P·s)·(1 − r)⌋`` perturbed entries stay (never more than
    are perturbed now) and ``⌊min((P − P·s)·r, P·s)⌋`` join."""
    s, r = _exact(sparsity), _exact(round(drop_rate, 12))
    dense = size - size * s  # P − P·s, exactly
    return math.floor(dense * (1 - r)), math.floor(min(dense * r, size * s))


def drop_rate_at(initial: float, epoch: float, total_epochs: int) -> float:
    """SSAM-D's drop rate ``r₀·(1 + cos(π·e/E_total))/2``: ``r₀`` at 0, ``r₀/2`` half way, 0 at the end."""
    return initial * (1 + math.cos(math.pi * epoch / total_epochs)) / 2


def refresh_due(epoch: int, update_freq: int) -> bool:
    """Whether the first step of (cumulative) epoch ``epoch`` refreshes the mask."""
    return epoch % update_freq == 0


def random_scores(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """SSAM-D's random scores (and its random initial mask), drawn from ``generator`` in float64:
    float32 has only 2^24 values in [0, 1), so a large model's scores would tie, and a top-k
    would break the ties as its implementation pleases."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(size, generator=generator, device=device, dtype=torch.float64)


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True on the ``k`` largest scores along the last dimension."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return mask


def regrown(old: torch.Tensor, death: torch.Tensor, growth: torch.Tensor, keep: int, grow: int) -> torch.Tensor:
    """SSAM-D's new mask: of the entries ``old`` perturbs, the (at most) ``keep`` with the largest
    ``death`` score, and of the others the ``grow`` with the largest ``growth`` score. The cap at
    the number now perturbed is read on the device, per client, with no host sync."""
    new = torch.zeros_like(old)
    if keep > 0:
        top = death.masked_fill(~old, -math.inf).topk(keep, dim=-1).indices  # largest first
        new.scatter_(-1, top, torch.arange(keep, device=old.device) < old.sum(-1, keepdim=True))
    if grow > 0:
        new.scatter_(-1, growth.masked_fill(old, -math.inf).topk(grow, dim=-1).indices, True)
    return new


class SparseSAM(PerturbThenDescend):
    """SAM with a sparse perturbation mask, refreshed by the Fisher (SSAM-F) or dynamic (SSAM-D) rule.

    Plain loop, like SAM: give ``steps_per_epoch`` (and ``fisher_loss`` for SSAM-F,
    ``total_epochs`` for SSAM-D) and call ``step(closure)``; the refreshes happen by themselves.
    Without ``steps_per_epoch`` nothing is refreshed automatically: call ``refresh_fisher`` or
    ``load_mask`` yourself.

    ``fisher_loss(j)`` returns the loss of the ``j``-th (``j = 0..num_samples−1``) of randomly
    drawn single training examples (batch size 1, training transforms) at the current weights;
    it decides the model's mode (the reference leaves BatchNorm in training mode, so its running
    statistics see each example; wrap the call in ``frozen_running_stats`` to avoid that).
    ``generator`` draws SSAM-D's random initial mask and random scores (``None``: torch's global RNG).

    ``rho`` may differ per parameter group; norms and rankings are over all parameters together.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        sparsity: float = 0.2,
        mode: str = "fisher",
        norm: str = "full",
        steps_per_epoch: int | None = None,
        update_freq: int = 5,
        fisher_loss: Callable[[int], torch.Tensor] | None = None,
        num_samples: int = 1024,
        drop_rate: float = 0.5,
        death: str = "gradient",
        growth: str = "random",
        total_epochs: int | None = None,
        generator: torch.Generator | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_rho(rho)
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1] (the fraction of entries not perturbed), got {sparsity}")
        if mode not in SSAM_MODES:
            raise ValueError(f"mode must be one of {SSAM_MODES}, got {mode!r}")
        if norm not in SSAM_NORMS:
            raise ValueError(f"norm must be one of {SSAM_NORMS}, got {norm!r}")
        _positive_int(steps_per_epoch, "steps_per_epoch", allow_none=True)
        _positive_int(update_freq, "update_freq")
        _positive_int(num_samples, "num_samples")
        _positive_int(total_epochs, "total_epochs", allow_none=True)
        if not 0 <= drop_rate <= 1:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        for name, score in (("death", death), ("growth", growth)):
            if score not in SSAM_SCORES:
                raise ValueError(f"{name} must be one of {SSAM_SCORES}, got {score!r}")
        if mode == "dynamic" and steps_per_epoch is not None and total_epochs is None:
            raise ValueError("total_epochs (E_total of the drop-rate cosine) is needed for mode='dynamic' "
                             "with steps_per_epoch")
        super().__init__(params, base_optimizer, dict(rho=rho), base_kwargs)
        self.sparsity, self.mode, self.norm = sparsity, mode, norm
        self.update_freq, self.fisher_loss, self.num_samples = update_freq, fisher_loss, num_samples
        self.drop_rate, self.death, self.growth, self.total_epochs = drop_rate, death, growth, total_epochs
        self.generator = generator
        self.set_epoch(0, steps_per_epoch)
        self.load_mask(None)

    # -- the mask: client state ------------------------------------------------------------------

    def mask(self) -> list[torch.Tensor]:
        """A copy of the mask (1 = perturbed), one tensor per parameter in ``param_groups`` order."""
        return [m.clone() for m in self._buffers(self._all_params(), "mask")]

    @torch.no_grad()
    def load_mask(self, masks: Sequence[torch.Tensor] | None) -> None:
        """Set the mask (bool or 0/1 tensors in ``param_groups`` order); ``None``: the mode's initial mask."""
        params = self._all_params()
        buffers = self._buffers(params, "mask")
        if masks is None:
            if self.mode == "dynamic":
                self._set_top(self._random_scores(), perturbed_count(self._size(), self.sparsity))
            else:
                torch._foreach_zero_(buffers)
            return
        masks = list(masks)
        if len(masks) != len(params):
            raise ValueError(f"mask: {len(masks)} tensors for {len(params)} parameters")
        for p, m in zip(params, masks):
            if m.shape != p.shape:
                raise ValueError(f"mask: a tensor of shape {tuple(m.shape)} for a parameter of shape {tuple(p.shape)}")
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("mask: entries must be 0 or 1")
        torch._foreach_copy_(buffers, [m.to(b.device) for m, b in zip(masks, buffers)])

    def _size(self) -> int:
        return sum(p.numel() for p in self._all_params())

    def _set_top(self, scores: torch.Tensor, k: int) -> None:
        """Mask = 1 on the ``k`` largest of the flat ``scores`` over all parameters, 0 elsewhere."""
        self._unflatten_into(self._buffers(self._all_params(), "mask"), top_mask(scores, k))

    @staticmethod
    def _unflatten_into(buffers: list[torch.Tensor], flat: torch.Tensor) -> None:
        pieces = flat.split([b.numel() for b in buffers])
        torch._foreach_copy_(buffers, [piece.view(b.shape).to(b.device) for piece, b in zip(pieces, buffers)])

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        device = tensors[0].device if tensors else None
        return torch.cat([t.reshape(-1).to(device) for t in tensors]) if tensors else torch.zeros(0)

    def _random_scores(self) -> torch.Tensor:
        return random_scores(self._size(), self.generator)

    # -- the schedule ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int, steps_per_epoch: int | None = None, drop_rate: float | None = None) -> None:
        """Make the next step the first of (cumulative) epoch ``epoch``.

        A federated client calls this each round with its own epoch count and step count per
        epoch (``⌈n_i/b⌉``), and for SSAM-D with the round's drop rate ``drop_rate_at(t)``;
        ``drop_rate=None`` uses ``drop_rate_at(epoch)`` at each refresh, the plain-loop schedule.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        _positive_int(steps_per_epoch, "steps_per_epoch", allow_none=True)
        if drop_rate is not None and not 0 <= drop_rate <= 1:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        self.steps_per_epoch, self._round_drop_rate = steps_per_epoch, drop_rate
        self._first_epoch, self._steps = epoch, 0

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to: what a federated client keeps for its next round."""
        return self._first_epoch + (self._steps // self.steps_per_epoch if self.steps_per_epoch else 0)

    def drop_rate_at(self, epoch: float) -> float:
        """SSAM-D's drop rate ``r₀·(1 + cos(π·e/E_total))/2``: ``r₀`` at 0, ``r₀/2`` half way, 0 at the end."""
        if self.total_epochs is None:
            raise ValueError("drop_rate_at needs total_epochs (E_total, or the number of rounds T in a federation)")
        return drop_rate_at(self.drop_rate, epoch, self.total_epochs)

    def _refresh_due(self) -> bool:
        """Whether this step is the first of an epoch ``e`` with ``e mod update_freq = 0``."""
        spe = self.steps_per_epoch
        return spe is not None and self._steps % spe == 0 and refresh_due(self.epoch, self.update_freq)

    # -- the two refresh rules -------------------------------------------------------------------

    @torch.no_grad()
    def refresh_fisher(self, fisher_loss: Callable[[int], torch.Tensor] | None = None,
                       num_samples: int | None = None) -> None:
        """SSAM-F: mask = top ``⌊P·(1 − s)⌋`` of ``Σ_j (∇ℓ_j)²`` at the current weights.

        Runs ``num_samples`` single-example backward passes; gradients are zeroed before each (the
        reference adds the first to the gradient its last step left behind) and after the last.
        """
        fisher_loss = fisher_loss if fisher_loss is not None else self.fisher_loss
        num_samples = num_samples if num_samples is not None else self.num_samples
        if fisher_loss is None:
            raise ValueError("SSAM-F needs fisher_loss(j), the loss of the j-th random single training example")
        _positive_int(num_samples, "num_samples")
        params = self._all_params()
        fisher = self._buffers(params, "fisher")
        torch._foreach_zero_(fisher)
        for j in range(num_samples):
            self.zero_grad()
            with torch.enable_grad():
                fisher_loss(j).backward()
            with_grad = [(f, p.grad) for f, p in zip(fisher, params) if p.grad is not None]
            if with_grad:
                torch._foreach_addcmul_([f for f, _ in with_grad], [g for _, g in with_grad],
                                        [g for _, g in with_grad])
        self.zero_grad()
        self._set_top(self._flat(fisher), perturbed_count(self._size(), self.sparsity))

    @torch.no_grad()
    def refresh_dynamic(self, drop_rate: float) -> None:
        """SSAM-D: drop the weakest perturbed entries, grow as many new ones as the rule allows.

        ``step`` calls this between its passes, so ``p.grad`` holds ``g`` and "weight" scores read
        the saved ``w`` (the reference reads ``w + ε``). Called on its own, it reads ``p.grad`` and
        the current weights.
        """
        params = self._all_params()
        buffers = self._buffers(params, "mask")
        perturbed = {id(p) for p in self._perturbed}
        old = self._flat(buffers).bool()
        keep, grow = dynamic_counts(self._size(), self.sparsity, drop_rate)

        def scores(kind: str) -> torch.Tensor:
            if kind == "random":
                return self._random_scores().to(old.device)
            if kind == "gradient":
                values = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            else:
                values = [self.state[p]["old_p"] if id(p) in perturbed else p for p in params]
            return self._flat(values).abs().to(old.device)

        death = scores(self.death)  # drawn first, as the rule reads
        new = regrown(old, death, scores(self.growth), keep, grow)
        self._unflatten_into(buffers, new)

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move from ``w`` to ``w + ε`` with the masked perturbation, from the gradients in ``p.grad``."""
        pending = self._gradients_aside()
        if self.norm == "masked":
            for _, params, eps in pending:
                torch._foreach_mul_(eps, self._buffers(params, "mask"))
        if not pending:
            return
        norm = self._joint_norm([eps for _, _, eps in pending])
        for group, params, eps in pending:
            if self.norm == "full":
                torch._foreach_mul_(eps, self._buffers(params, "mask"))  # after the norm of the full g
            torch._foreach_mul_(eps, group["rho"] / (norm + XI))
            torch._foreach_add_(params, eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """Two passes on the closure's minibatch (plus a refresh when one is due); returns the loss at ``w``."""
        closure = require_closure(closure, "SparseSAM")
        refresh, epoch = self._refresh_due(), self.epoch
        loss = closure()
        self.first_step()
        if refresh and self.mode == "dynamic":
            rate = self._round_drop_rate if self._round_drop_rate is not None else self.drop_rate_at(epoch)
            self.refresh_dynamic(rate)
        closure()
        self.second_step()
        self._steps += 1
        if refresh and self.mode == "fisher":
            self.refresh_fisher()
        return loss


# -- a federated client's state, and handing it to a client's optimizer ------------------------------


class ExampleStream(Protocol):
    """Where SSAM-F's Fisher examples come from (``fedsam.data.SingleExamples``)."""

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class SparseState:
    """One client's Sparse SAM state for a round, as both engines read it (``load_client_state``
    here, ``fedsam.cohort.train_cohort`` batched): its mask by parameter name (``None``: the mode's
    initial mask) and its cumulative local epochs, carried between rounds; and for this round,
    SSAM-F's Fisher examples and SSAM-D's generator (``None``: the optimizer's own, from its
    ``seed``, else torch's global RNG)."""

    mask: dict[str, torch.Tensor] | None = None
    epoch: int = 0
    examples: ExampleStream | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)


def load_client_state(optimizer: SparseSAM, model: torch.nn.Module, state: SparseState, names: list[str],
                      steps_per_epoch: int, sparse_round: int) -> None:
    """Hand one client's state to its optimizer for a round: the generator (before the initial
    mask, which SSAM-D draws from it), the mask, the epoch count, the round's SSAM-D drop rate
    ``r₀(1 + cos(π t/T))/2`` with ``t = sparse_round``, and SSAM-F's Fisher examples, the next of
    the client's stream each (``names``: the parameters in ``param_groups`` order)."""
    if state.generator is not None:
        optimizer.generator = state.generator
    optimizer.load_mask(None if state.mask is None else [state.mask[n] for n in names])
    drop = optimizer.drop_rate_at(sparse_round) if optimizer.mode == "dynamic" else None
    optimizer.set_epoch(state.epoch, steps_per_epoch=steps_per_epoch, drop_rate=drop)
    examples = state.examples
    if examples is None:
        return

    def fisher_loss(_: int) -> torch.Tensor:
        x, y = examples.take(1)
        return torch.nn.functional.cross_entropy(model(x), y)

    optimizer.fisher_loss = fisher_loss
