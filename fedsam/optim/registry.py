"""Optimizers by name or import path, so a config string picks the client optimizer.

A *spec* is a registered name (``sgd``, ``sam``, ``asam``, ``fgsm-sam``, ``dual-sam``, ``ssam-f``,
``ssam-d``, ``lesam``, ``gf-sam`` or one added with ``register``) or an import path ``package.module:factory``.
A factory is any callable ``factory(params, **options) -> optimizer``; the optimizer follows
``torch.optim``'s shape and its ``step(closure)`` accepts a closure that zeroes the gradients, runs
forward and backward on one minibatch, and returns the loss. A multi-pass optimizer (SAM-like) calls the closure as
often as it needs and exposes the optimizer that takes the final step as ``base_optimizer``;
without that attribute the optimizer is treated as first-order (one closure call per step).

Ray workers and Flower SuperNodes are other processes: they import a path themselves, and only
know the built-in names. ``portable_spec`` turns a name registered in this process into the
import path of its factory before a config leaves the process.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .dual_sam import DualSAM
from .fgsm import FGSMSAM
from .gf_sam import GlobalFlatSAM
from .lesam import FixedPerturbation
from .sam import SAM
from .ssam import SparseSAM

Factory = Callable[..., torch.optim.Optimizer]


class OptimizerSpecError(ValueError):
    """A spec that names no optimizer, does not import, or whose factory failed."""


def sgd(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> torch.optim.Optimizer:
    """Plain SGD, the baseline: one forward/backward pass per step."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


#: The federated SAM papers' radius (FedSAM, MoFedSAM, Caldarola et al.): what SAM gets under a
#: SAM strategy unless ρ is given. Plain ``sam`` keeps Foret et al.'s 0.05.
FEDERATED_RHO = 0.1


def sam(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
        rho: float = 0.05) -> SAM:
    """SAM over SGD (ρ = 0.05 as in the paper; the federated papers use ``FEDERATED_RHO``)."""
    return SAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=momentum, weight_decay=weight_decay)


def asam(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
         rho: float = 0.5, eta: float = 0.01) -> SAM:
    """ASAM over SGD (ρ = 0.5, η = 0.01 as in Kwon et al.; Caldarola et al. use 0.7 and 0.2)."""
    return SAM(params, torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=lr, momentum=momentum,
               weight_decay=weight_decay)


def fgsm_sam(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
             rho: float | None = None, steps: int = 1, ascent_momentum: float = 0.0) -> FGSMSAM:
    """Multi-step FGSM SAM over SGD; ``rho=None`` is the L2-equivalent default (see ``FGSMSAM``)."""
    return FGSMSAM(params, torch.optim.SGD, rho=rho, steps=steps, ascent_momentum=ascent_momentum,
                   lr=lr, momentum=momentum, weight_decay=weight_decay)


def dual_sam(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
             rho: float = FEDERATED_RHO) -> DualSAM:
    """FedSMOO's SAM with a perturbation dual over SGD (ρ = 0.1 as in Sun et al. 2023)."""
    return DualSAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=momentum, weight_decay=weight_decay)


def ssam_f(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
           rho: float = 0.05, sparsity: float = 0.2, num_samples: int = 1024, update_freq: int = 5,
           ssam_norm: str = "full") -> SparseSAM:
    """SSAM-F over SGD (Mi et al. 2022 defaults). Its schedule and examples are set by the caller:
    ``set_epoch(epoch, steps_per_epoch)`` and ``fisher_loss``; the mask is client state."""
    return SparseSAM(params, torch.optim.SGD, rho=rho, sparsity=sparsity, mode="fisher", norm=ssam_norm,
                     num_samples=num_samples, update_freq=update_freq, lr=lr, momentum=momentum,
                     weight_decay=weight_decay)


def ssam_d(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
           rho: float = 0.05, sparsity: float = 0.2, drop_rate: float = 0.5, death: str = "gradient",
           growth: str = "random", update_freq: int = 5, total_epochs: int | None = None,
           ssam_norm: str = "full", seed: int | None = None) -> SparseSAM:
    """SSAM-D over SGD (Mi et al. 2022 defaults). The caller sets ``set_epoch(epoch, steps_per_epoch,
    drop_rate)``; ``seed`` seeds the random initial mask and random scores; the mask is client state."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SparseSAM(params, torch.optim.SGD, rho=rho, sparsity=sparsity, mode="dynamic", norm=ssam_norm,
                     drop_rate=drop_rate, death=death, growth=growth, update_freq=update_freq,
                     total_epochs=total_epochs, generator=generator, lr=lr, momentum=momentum,
                     weight_decay=weight_decay)


def lesam(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0) -> FixedPerturbation:
    """FedLESAM's client: SGD with the gradient taken at ``w + ε`` for an ``ε`` the server sends."""
    return FixedPerturbation(params, torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay)


#: FedGF's radius: the middle of its published grid {0.02, 0.05, 0.1}.
FEDGF_RHO = 0.05


def gf_sam(params: Iterable, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
           rho: float = FEDGF_RHO) -> GlobalFlatSAM:
    """FedGF's client: SAM over SGD whose second pass moves towards the server's global point."""
    return GlobalFlatSAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=momentum, weight_decay=weight_decay)


#: The built-in Sparse SAM specs and their mask rules; their mask is client state.
SPARSE_SAM = {"ssam-f": "fisher", "ssam-d": "dynamic"}

BUILTIN: dict[str, Factory] = {"sgd": sgd, "sam": sam, "asam": asam, "fgsm-sam": fgsm_sam, "dual-sam": dual_sam,
                               "ssam-f": ssam_f, "ssam-d": ssam_d, "lesam": lesam, "gf-sam": gf_sam}
_registry: dict[str, Factory] = dict(BUILTIN)


def register(name: str, factory: Factory) -> None:
    """Make ``name`` a spec for ``factory`` in this process (see ``portable_spec`` for Ray)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"an optimizer name must be a non-empty string without ':', got {name!r}")
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in optimizer and cannot be replaced")
    if not callable(factory):
        raise ValueError(f"the factory for {name!r} must be callable, got {type(factory).__name__}")
    _registry[name] = factory


def unregister(name: str) -> None:
    """Forget a name ``register`` added (built-ins stay); unknown names are ignored."""
    if name not in BUILTIN:
        _registry.pop(name, None)


def names() -> list[str]:
    return sorted(_registry)


def resolve(spec: str) -> Factory:
    """The factory a spec names; ``OptimizerSpecError`` says why when there is none."""
    if not isinstance(spec, str) or not spec.strip():
        raise OptimizerSpecError(f"an optimizer spec must be a non-empty string, got {spec!r}")
    if spec in _registry:
        return _registry[spec]
    if ":" not in spec:
        raise OptimizerSpecError(
            f"unknown optimizer {spec!r} (known: {', '.join(names())}; "
            "or an import path 'package.module:factory')"
        )
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
        raise OptimizerSpecError(
            f"optimizer {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise OptimizerSpecError(f"optimizer {spec!r}: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(target):
        raise OptimizerSpecError(f"optimizer {spec!r}: {attr!r} is not callable")
    return target


def _accepted(factory: Factory, options: dict[str, Any]) -> dict[str, Any]:
    """The options the factory's signature names (all of them if it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return options
    named = {p.name for p in parameters}
    return {k: v for k, v in options.items() if k in named}


def build(spec: str, params: Iterable, **options: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``spec`` names over ``params``.

    Options that are ``None`` are dropped, so the factory's default applies; options its
    signature does not name are not passed, so one config (lr, momentum, rho, ...) serves SGD,
    SAM and a custom factory alike.
    """
    factory = resolve(spec)
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return factory(params, **_accepted(factory, given))
    except Exception as exc:  # noqa: BLE001 - report the factory's own error, named
        raise OptimizerSpecError(f"optimizer {spec!r}: {type(exc).__name__}: {exc}") from exc


def restart(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Make a built-in optimizer behave as if just built with learning rate ``lr``, keeping its memory.

    Federated clients start each round with a fresh optimizer. For the built-ins (SGD underneath)
    zeroing the momentum buffers in place is exactly that: SGD's first step from a zero buffer
    gives ``0·μ + g = g``, bit for bit what a fresh buffer holds. SAM's scratch tensors are
    overwritten every step. Custom optimizers are simply built again.
    """
    base = getattr(optimizer, "base_optimizer", optimizer)
    if not isinstance(base, torch.optim.SGD):
        raise TypeError(f"restart() supports the SGD-based built-ins, not {type(base).__name__}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    for state in base.state.values():
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            buffer.zero_()


def portable_spec(spec: str) -> str:
    """The spec as another process resolves it: registered names become ``module:qualname``."""
    factory = resolve(spec)
    if spec in BUILTIN or ":" in spec:
        return spec
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise OptimizerSpecError(
            f"optimizer {spec!r} is registered in this process only and Ray workers cannot import it; "
            "define the factory in an importable module and pass 'module:factory'"
        )
    path = f"{module}:{qualname}"
    try:
        same = resolve(path) is factory
    except OptimizerSpecError:
        same = False
    if not same:
        raise OptimizerSpecError(f"optimizer {spec!r}: its factory is not importable as {path!r}")
    return path
