"""Local training and evaluation: the client's hot loop, usable without Flower.

``train_locally`` runs any optimizer that follows the ``fedsam.optim`` protocol over minibatches
that already live on the training device. Per step it builds nothing: one closure, made once,
reads the current minibatch; running loss and accuracy stay on the device until the end, so
the loop never waits for the device (no ``.item()`` per step).

Right before each descent step, after the last gradient ``g`` is known, the direction is
assembled as FL-Simulator's methods do (algorithms-family.md, section 0.2):

    d = α·g + (1 − α)·m + b + κ·w,    then clipped to ``grad_clip``

- ``α``, ``m``: FedCM's and MoFedSAM's global-momentum mix (``momentum_alpha``, ``global_momentum``);
- ``b``: a vector constant for the round (``correction``): SCAFFOLD's ``c − c_i``, FedDyn's
  ``λ(h_i − w_{i,0})``, FedProx's ``−μ·w_{i,0}``;
- ``κ·w``: weight decay inside the clipped direction (``direction_decay``; FedProx's paper form).

The base optimizer then adds its own weight decay ``ω·w`` (never clipped, never scaled by ``α``)
and steps. For a multi-pass optimizer this hooks its ``base_optimizer.step``, so the ascent
passes see the plain gradient; for a first-order optimizer it runs at the end of its single
closure call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fedsam.graphs import GraphedStep
from fedsam.optim import FirstPassStats


@dataclass(frozen=True)
class LocalResult:
    num_examples: int  # the client's dataset size n_i
    num_steps: int  # optimizer steps K_i
    loss: float  # mean training loss over the round, measured on each step's first pass
    accuracy: float
    seconds: float


def _descent_transform(params: list[torch.Tensor], grad_clip: float, momentum: list[torch.Tensor] | None,
                       alpha: float, correction: list[torch.Tensor] | None,
                       direction_decay: float) -> Callable[[], None] | None:
    """``p.grad ← clip(α·g + (1 − α)·m + b + κ·w)``, in place; ``None`` when it is the identity."""
    if momentum is None and correction is None and direction_decay == 0 and not grad_clip > 0:
        return None

    weights = [p.detach() for p in params]  # views of w, made once

    def transform() -> None:
        grads = [p.grad for p in params]
        if momentum is not None:
            torch._foreach_mul_(grads, alpha)
            torch._foreach_add_(grads, momentum, alpha=1.0 - alpha)
        if correction is not None:
            torch._foreach_add_(grads, correction)
        if direction_decay != 0:
            torch._foreach_add_(grads, weights, alpha=direction_decay)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)

    return transform


def train_locally(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    *,
    grad_clip: float = 0.0,
    global_momentum: dict[str, torch.Tensor] | None = None,
    momentum_alpha: float = 1.0,
    correction: dict[str, torch.Tensor] | None = None,
    direction_decay: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    num_examples: int | None = None,
    cuda_graph: bool = False,
) -> LocalResult:
    """Train ``model`` in place for ``epochs`` passes over ``batches``.

    ``global_momentum`` (MoFedSAM's and FedCM's ``m_t``) and ``correction`` (the round's constant
    ``b``) map parameter names to tensors on the model's device; ``direction_decay`` is ``κ``
    (see the module docstring); ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs the forward pass in
    autocast while weights, gradients and SAM's perturbation norm stay in float32.
    ``cuda_graph`` replays full-size steps as one CUDA graph on a GPU (``fedsam.graphs``); a
    short last batch runs eagerly. It needs an optimizer that steps in place without host syncs,
    as the built-ins do.
    """
    start = time.perf_counter()
    model.train()
    device = next(model.parameters()).device
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    momentum = [global_momentum[name] for name, _ in named] if global_momentum is not None else None
    constant = [correction[name] for name, _ in named] if correction is not None else None
    transform = _descent_transform(params, grad_clip, momentum, momentum_alpha, constant, direction_decay)
    base = getattr(optimizer, "base_optimizer", None)

    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    batch: dict[str, torch.Tensor] = {}
    graphing = cuda_graph and device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=not graphing)
                if autocast_dtype is not None else contextlib.nullcontext())

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        x, y = batch["x"], batch["y"]
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        if guarded.passes == 1:  # the step's first pass, at w: this is the training loss
            loss_sum.add_(loss.detach() * len(y))
            correct.add_((logits.argmax(dim=1) == y).sum())
        if transform is not None and base is None:
            transform()  # a first-order optimizer calls its closure once per step
        return loss

    guarded = FirstPassStats(model, closure)
    hook = base.register_step_pre_hook(lambda *_: transform()) if transform is not None and base is not None else None

    def step() -> None:
        guarded.new_step()
        optimizer.step(guarded)

    graph: GraphedStep | None = None
    static: dict[str, torch.Tensor] = {}
    steps = seen = 0
    try:
        for _ in range(epochs):
            for x, y in batches:
                if graphing and (not static or static["x"].shape == x.shape):
                    if graph is None:  # the first batch fixes the graph's shapes; others run eagerly
                        static = {"x": x.clone(), "y": y.clone()}
                        graph = GraphedStep(step, device)
                    static["x"].copy_(x)
                    static["y"].copy_(y)
                    batch.update(static)
                    graph()
                else:
                    batch["x"], batch["y"] = x, y
                    step()
                steps += 1
                seen += len(y)
    finally:
        if hook is not None:
            hook.remove()
    if steps == 0:
        raise ValueError("no minibatch to train on")
    mean_loss, accuracy = (loss_sum / seen).item(), correct.item() / seen
    return LocalResult(num_examples if num_examples is not None else seen // epochs, steps, mean_loss, accuracy,
                       time.perf_counter() - start)


class Evaluation(NamedTuple):
    loss: float  # mean cross-entropy
    accuracy: float  # top-1
    top5_accuracy: float  # the label among the five largest logits (1.0 with five classes or fewer)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             autocast_dtype: torch.dtype | None = None) -> Evaluation:
    """Mean cross-entropy, top-1 and top-5 accuracy of ``model`` over ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    correct5 = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for x, y in batches:
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct5 += (top == y[:, None]).any(dim=1).sum()
        seen += len(y)
    return Evaluation((loss_sum / seen).item(), correct.item() / seen, correct5.item() / seen)
