"""What every perturb-then-descend optimizer shares: the base optimizer, exact restore, state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

Closure = Callable[[], torch.Tensor]

#: ξ in every normalisation ``v / (‖v‖ + ξ)`` of this package (algorithms.md's 1e-12).
XI = 1e-12


def check_rho(rho: float) -> None:
    """A radius must be finite and ``>= 0``. ``ρ = 0`` is allowed on purpose: the step keeps its
    passes but perturbs by nothing, so it equals the base method (the spec's test hooks, such as
    FedGAMMA ≡ SCAFFOLD and FedSpeed ≡ FedDyn, and FedGloSS's ramp from ``ρ_0 = 0``)."""
    if not (rho >= 0 and rho != float("inf")):
        raise ValueError(f"rho must be >= 0, got {rho}")


class PerturbThenDescend(torch.optim.Optimizer):
    """Wraps a base optimizer that takes exactly one step per minibatch, at the restored weights.

    Subclasses move the weights to ``w + ε`` (``first_step``); ``second_step`` puts ``w`` back
    bit for bit and lets the base optimizer step with the gradient found at ``w + ε``. The base
    optimizer shares ``param_groups``, so schedulers and ``group["lr"]`` edits reach it, and it
    is exposed as ``base_optimizer`` so a training loop can hook its step (see ``fedsam.train``).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(params, {**defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed: list[torch.Tensor] = []

    def _buffers(self, params: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """Per-parameter scratch tensors, allocated on first use and reused every step."""
        out = []
        for p in params:
            state = self.state[p]
            if name not in state:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(state[name])
        return out

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _load(self, name: str, values: Iterable[torch.Tensor] | None, label: str) -> None:
        """Copy one tensor per parameter (``param_groups`` order) into the buffers ``name``, for
        state a federation hands the optimizer each round (a dual, a perturbation); ``None`` zeroes them."""
        params = self._all_params()
        buffers = self._buffers(params, name)
        if values is None:
            torch._foreach_zero_(buffers)
            return
        values = list(values)
        if len(values) != len(params):
            raise ValueError(f"{label}: {len(values)} tensors for {len(params)} parameters")
        torch._foreach_copy_(buffers, values)

    @staticmethod
    def _with_grad(group: dict) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _remember(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``w`` aside so ``second_step`` can restore it exactly."""
        old = self._buffers(params, "old_p")
        torch._foreach_copy_(old, params)
        self._perturbed.extend(params)
        return old

    def _gradients_aside(self) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]:
        """Per group with gradients: ``w`` set aside (``_remember``) and its scratch ``e_w`` holding a
        copy of ``g``, for a subclass to shape into its ε."""
        out = []
        for group in self.param_groups:
            params = self._with_grad(group)
            if params:
                self._remember(params)
                eps = self._buffers(params, "e_w")
                torch._foreach_copy_(eps, [p.grad for p in params])
                out.append((group, params, eps))
        return out

    @staticmethod
    def _joint_norm(tensor_lists: list[list[torch.Tensor]]) -> torch.Tensor:
        """One L2 norm over every tensor of every list, left on the device (no host sync)."""
        return torch.stack([torch.stack(torch._foreach_norm(ts)).square().sum() for ts in tensor_lists]).sum().sqrt()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly and take the base step with the gradient at ``w + ε``."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self.state[p]["old_p"] for p in self._perturbed])
            self._perturbed = []
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def first_step(self, zero_grad: bool = False) -> None:
        """Move from ``w`` to ``w + ε`` using the gradients now in ``p.grad`` (each subclass's own)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """Two forward/backward passes on the closure's minibatch; returns the loss at ``w``."""
        closure = require_closure(closure, type(self).__name__)
        loss = closure()
        self.first_step()
        closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers, groups); the perturbation lives one step only."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def require_closure(closure: Closure | None, name: str) -> Closure:
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that zeroes the gradients, runs forward and backward "
            "on the minibatch, and returns the loss"
        )
    return torch.enable_grad()(closure)
