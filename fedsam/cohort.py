"""Many clients as one batched model: a cohort trains in lockstep, one kernel launch for all.

On a GPU a client step of a small model is a few hundred tiny kernels, so clients trained one
after another are bound by launches, not arithmetic. Here the cohort's weights are stacked along a
leading client dimension and every step runs once for all of them (``torch.func``: ``vmap`` over
``grad`` of a ``functional_call``). Each client stays itself:

- its own minibatches, drawn through its own ``DeviceBatches`` generator, so the crops, flips and
  order are those it would see alone;
- its own reductions: SAM's and ASAM's ‖·‖₂, FGSM SAM's ‖·‖₁, the clipping norm;
- its own step count: a client whose data has run out this epoch is masked, so its weights,
  momentum and weight decay stand still until its next epoch starts (never padded into an update).

A short batch is padded with zero-weight samples; the loss is the mean over real samples, so the
padding changes nothing (no BatchNorm here: per-sample normalisation only, see ``batchable``).

Every built-in rule batches (SGD, SAM, ASAM, FGSM SAM, FedLESAM's ``lesam`` and FedGF's ``gf-sam``,
whose ε and ``w̃`` come in the message, FedSMOO's ``dual-sam``, whose per-client dual ``u_i`` is
stacked like the weights and masked like them, and Sparse SAM's ``ssam-f`` and ``ssam-d``, whose
per-client masks are stacked too), with the whole descent direction of ``train_locally``:
MoFedSAM's and FedCM's momentum mix, each client's round correction ``b`` (SCAFFOLD, FedDyn,
FedProx), the direction decay ``κ·w`` and clipping. Sparse SAM's schedule is known on the host
before each epoch (a client refreshes at the first step of its cumulative epoch ``e`` with
``e mod f = 0``), so only the clients due that epoch refresh: SSAM-D inside that step, SSAM-F
after it, with its Fisher examples' gradients taken per example in one ``vmap`` per chunk rather
than one backward pass each. A plug-in optimizer is an object with its own ``step``, which
cannot be vectorised from outside: it trains one client at a time (``fedsam.train.train_locally``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fedsam.data.batches import DeviceBatches, crop_and_flip, to_device
from fedsam.graphs import GraphedStep
from fedsam.models import has_batch_norm
from fedsam.optim import ASAM_SCOPE, BUILTIN, asam_scaled, ssam
from fedsam.optim.base import XI, check_rho
from fedsam.optim.fgsm import l2_equivalent_rho
from fedsam.optim.ssam import SparseState
from fedsam.train import LocalResult

Tensors = dict[str, torch.Tensor]

#: The client rule each batchable built-in optimizer name stands for.
PERTURBATION = {"sgd": "none", "sam": "sam", "asam": "asam", "fgsm-sam": "fgsm", "lesam": "fixed",
                "gf-sam": "global-flat", "dual-sam": "dual", "ssam-f": "sparse-fisher", "ssam-d": "sparse-dynamic"}
SPARSE = ("sparse-fisher", "sparse-dynamic")

#: Per-example gradients a Fisher chunk holds at once, in entries (128 MiB in float32).
FISHER_CHUNK_ENTRIES = 1 << 25


@dataclass(frozen=True)
class ClientRule:
    """One local step of a built-in optimizer, as numbers: what ``build(spec, ...)`` would do."""

    perturbation: str  # none | sam | asam | fgsm | fixed (FedLESAM's ε) | global-flat (FedGF's) | dual
    #                    (FedSMOO's) | sparse-fisher | sparse-dynamic (Sparse SAM's)
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    rho: float | None = None  # None for fgsm: the L2-equivalent radius of the model
    eta: float = 0.0
    steps: int = 1
    ascent_momentum: float = 0.0
    # Sparse SAM's (fedsam.optim.ssam), set by ``of`` from the factories' defaults; None for other rules
    sparsity: float | None = None
    ssam_norm: str | None = None
    update_freq: int | None = None
    num_samples: int | None = None
    drop_rate: float | None = None
    death: str | None = None
    growth: str | None = None
    total_epochs: int | None = None
    seed: int | None = None

    @classmethod
    def of(cls, spec: str, options: dict) -> ClientRule:
        """The rule of a built-in spec with these options; the factory's own defaults fill the gaps."""
        if spec not in PERTURBATION:
            raise ValueError(f"optimizer {spec!r} has no batched rule")
        factory = BUILTIN[spec]
        accepted = inspect.signature(factory).parameters
        values = {name: p.default for name, p in accepted.items() if p.default is not inspect.Parameter.empty}
        values.update({k: v for k, v in options.items() if k in accepted and v is not None})
        if values.pop("nesterov", False):
            raise ValueError("Nesterov momentum has no batched rule")
        rule = cls(PERTURBATION[spec], **values)
        if rule.perturbation in SPARSE:  # SparseSAM checks its own options: one home for their limits
            probe = {**values, "seed": 0} if "seed" in values else values  # no draw from the global RNG
            factory([torch.zeros(1, requires_grad=True)], **probe)
        if rule.perturbation != "none" and rule.rho is not None:
            check_rho(rule.rho)  # as the optimizers: ρ = 0 is the base step with the rule's passes
        if rule.steps < 1:
            raise ValueError(f"steps must be >= 1, got {rule.steps}")
        return rule


def batchable(spec: str, model: nn.Module) -> str | None:
    """Why this client rule cannot run batched, or ``None`` when it can."""
    if spec not in BUILTIN:
        return f"optimizer {spec!r} is a plug-in with its own step"
    if spec not in PERTURBATION:
        return f"built-in optimizer {spec!r} has no batched rule"
    if has_batch_norm(model):
        return "BatchNorm's batch statistics would mix padded samples into real ones"
    return None


_said: set[str] = set()


def use_batched(setting: str, spec: str, model: nn.Module, device: torch.device, clients: int) -> bool:
    """Whether a worker trains its cohort batched: ``on`` wherever the rule allows, ``off`` never,
    ``auto`` where it was measured faster: on GPUs, for two clients or more (2.3–8x on the H200
    from 10 clients; slower for one, and 0.5–0.8x on a 2-core CPU; docs/performance.md). A rule
    that cannot batch falls back to one client at a time, said once per process."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"vectorize must be auto, on or off, got {setting!r}")
    if setting == "off" or (setting == "auto" and (device.type != "cuda" or clients < 2)):
        return False
    reason = batchable(spec, model)
    if reason is not None:
        if reason not in _said:
            _said.add(reason)
            print(f"fedsam: training clients one at a time: {reason}", file=sys.stderr, flush=True)
        return False
    return True


class CohortBatches:
    """The minibatches of several clients, step by step, gathered for all of them at once.

    Each epoch every client draws its order, crops and flips from its own ``DeviceBatches``; a
    per-client slot table (made once) places them into ``steps × clients × width`` index
    tensors. A step is then one gather over the stacked images of all clients.
    """

    def __init__(self, clients: list[DeviceBatches]) -> None:
        first = clients[0]
        for c in clients:
            if (c.device, c.augment, c.dtype, c.images.shape[1:]) != (first.device, first.augment, first.dtype,
                                                                        first.images.shape[1:]):
                raise ValueError("a cohort's clients must share device, augmentation, dtype and image shape")
            if not (torch.equal(c.scale, first.scale) and torch.equal(c.shift, first.shift)):
                raise ValueError("a cohort's clients must share the normalisation")
        self.clients = clients
        self.device = first.device
        self.steps = max(len(c) for c in clients)  # per epoch
        self.width = max(stop - start for c in clients for start, stop in c.bounds)
        self.scale, self.shift, self.dtype = first.scale, first.shift, first.dtype
        num = len(clients)
        sizes = [len(c.images) for c in clients]
        starts = torch.tensor([0] + sizes).cumsum(0)[:-1]  # where each client's images begin
        self.base = torch.cat([torch.full((size,), int(start)) for size, start in zip(sizes, starts)]).to(self.device)
        pad = sum(sizes)  # one all-zero image for the padding slots
        source = [c.padded if c.augment else c.images for c in clients]
        self.images = torch.cat(source + [torch.zeros_like(source[0][:1])])
        self.labels = torch.cat([c.labels for c in clients] + [torch.zeros_like(first.labels[:1])])
        self.grid = first.grid if first.augment else None
        slot = []  # where each position of each client's epoch order lands
        for ci, c in enumerate(clients):
            for k, (start, stop) in enumerate(c.bounds):
                slot.append(torch.arange(stop - start) + (k * num + ci) * self.width)
        self.slot = torch.cat(slot).to(self.device)
        total = self.steps * num * self.width
        self.sample = torch.full((total,), pad, device=self.device)
        weight = torch.zeros(total, device=self.device)
        weight[self.slot] = 1.0
        self.weight = weight.view(self.steps, num, self.width)
        self.active = torch.tensor([[k < len(c) for c in clients] for k in range(self.steps)], device=self.device)
        self.counts = self.weight.sum(2)  # real samples per (step, client)

    def epoch(self):
        """``(x, y, w)`` per step: ``clients × width`` images, labels and sample weights."""
        plans = [c.draw_epoch() for c in self.clients]  # on the CPU; one copy to the device below
        n = int(self.slot.numel())
        drawn = [torch.cat([order for order, _, _ in plans])]
        if self.clients[0].augment:
            drawn += [torch.cat([o for _, o, _ in plans]).flatten(), torch.cat([f for _, _, f in plans]).long()]
        drawn = to_device(torch.cat(drawn), self.device)
        sample = self.sample.clone()
        sample[self.slot] = drawn[:n] + self.base
        sample = sample.view(self.steps, len(self.clients), self.width)
        if self.clients[0].augment:
            offsets = torch.zeros(sample.numel(), 2, dtype=torch.int64, device=self.device)
            flips = torch.zeros(sample.numel(), dtype=torch.bool, device=self.device)
            offsets[self.slot] = drawn[n:3 * n].view(n, 2)
            flips[self.slot] = drawn[3 * n:].bool()
            offsets = offsets.view(*sample.shape, 2)
            flips = flips.view(sample.shape)
        for k in range(self.steps):
            idx = sample[k]
            if self.grid is not None:
                x = crop_and_flip(self.images, self.grid, idx, offsets[k], flips[k])
            else:
                x = self.images[idx]
            x = x.to(self.dtype).mul_(self.scale).sub_(self.shift)
            yield x, self.labels[idx], self.weight[k]


def _per_client(values: Tensors, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of ``fn(tensor)`` reduced over all but the client dimension."""
    return torch.stack([fn(v).flatten(1).sum(1) for v in values.values()]).sum(0)


def _scaled(values: Tensors, factor: torch.Tensor) -> Tensors:
    """Multiply each client's slice by its own factor (a ``clients`` vector)."""
    return {k: v * factor.view(-1, *[1] * (v.ndim - 1)) for k, v in values.items()}


def _combine(a: Tensors, b: Tensors, alpha: float = 1.0) -> Tensors:
    return {k: a[k] + alpha * b[k] for k in a}


def train_cohort(
    model: nn.Module,
    spec: str,
    options: dict,
    clients: list[DeviceBatches],
    epochs: int,
    *,
    grad_clip: float = 0.0,
    global_momentum: Tensors | None = None,
    momentum_alpha: float = 1.0,
    corrections: list[Tensors | None] | None = None,
    direction_decay: float = 0.0,
    perturbations: list[Tensors | None] | None = None,
    global_point: Tensors | None = None,
    global_weight: float = 0.0,
    duals: list[Tensors | None] | None = None,
    shift: Tensors | None = None,
    sparse: list[SparseState] | None = None,
    sparse_round: int = 0,
    autocast_dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
) -> list[tuple[Tensors, LocalResult]]:
    """Train every client in ``clients`` from ``model``'s weights, as ``train_locally`` would one by one.

    Returns, per client, its trained ``state_dict`` (parameters and buffers) and its
    ``LocalResult``; ``seconds`` is the whole cohort's time (the clients trained together).
    ``model`` itself is not changed.
    ``corrections`` holds each client's round constant ``b`` (in client order; ``None`` for a
    client without one) and ``direction_decay`` is ``κ``, as ``train_locally``'s ``correction``
    and ``direction_decay``: the direction is ``clip(α·g + (1 − α)·m + b + κ·w)``.
    ``perturbations`` holds each client's fixed ``ε`` for ``lesam`` (``None``: none, a plain step),
    as ``FixedPerturbation.load_perturbation``; ``global_point`` and ``global_weight`` are ``gf-sam``'s
    ``w̃`` and ``κ``, as ``GlobalFlatSAM.load_global``.
    ``duals`` and ``shift`` are ``dual-sam``'s ``u_i`` (in client order; ``None``: zero) and ``s``, as
    ``DualSAM.load_duals``. ``duals`` is in and out: after the round each entry is replaced by
    that client's ``u_i`` (a view on the cohort's device), what ``DualSAM.duals`` reads one client at a time.
    ``sparse`` is ``ssam-f``'s and ``ssam-d``'s per-client state (in client order; ``None``: every
    client fresh), in and out: after the round each entry holds that client's mask and epoch
    count, what ``SparseSAM.mask`` and ``SparseSAM.epoch`` give one client at a time;
    ``sparse_round`` is the ``t`` of SSAM-D's round drop rate ``r₀(1 + cos(πt/T))/2``.
    Every step has the same shapes (short batches are padded), so with ``cuda_graph`` on a GPU
    the whole cohort step is captured once and replayed (``fedsam.graphs``); not Sparse SAM's,
    whose refresh steps differ from the others.
    """
    start = time.perf_counter()
    reason = batchable(spec, model)
    if reason is not None:
        raise ValueError(f"this cohort cannot be batched: {reason}")
    rule = ClientRule.of(spec, options)
    num = len(clients)
    data = CohortBatches(clients)
    device = data.device
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    scope = options.get("asam_scope") or ASAM_SCOPE  # as SAM(model.named_parameters(), adaptive=True) scales
    weights_nd = {n: asam_scaled(n, p, scope) for n, p in model.named_parameters()}  # ASAM's scaled tensors
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    params = {n: p.detach().unsqueeze(0).repeat(num, *[1] * p.ndim) for n, p in model.named_parameters()
              if n in names}
    velocity = {n: torch.zeros_like(v) for n, v in params.items()} if rule.momentum != 0 else None
    rho = rule.rho
    if rule.perturbation == "fgsm" and rho is None:
        rho = l2_equivalent_rho(sum(p.numel() for p in model.parameters()))  # as FGSMSAM counts them
    mix = None
    if global_momentum is not None:
        mix = {n: global_momentum[n].to(device) for n in names}
    bias = _stacked_corrections(corrections, params, num)
    if perturbations is not None and rule.perturbation != "fixed":
        raise ValueError(f"optimizer {spec!r} takes no fixed perturbation (lesam does)")
    if global_point is not None and rule.perturbation != "global-flat":
        raise ValueError(f"optimizer {spec!r} takes no global point (gf-sam does)")
    fixed = _stacked_corrections(perturbations, params, num)  # ε_i, or None: every step at w
    if (duals is not None or shift is not None) and rule.perturbation != "dual":
        raise ValueError(f"optimizer {spec!r} keeps no duals (dual-sam does)")
    if duals is not None and len(duals) != num:
        raise ValueError(f"duals must have one entry per client ({num}), got {len(duals)}")
    dual = None
    if rule.perturbation == "dual":  # u_i, stacked; s, the same for every client
        dual = _stacked_corrections(duals, params, num) or {n: torch.zeros_like(v) for n, v in params.items()}
        dual = (dual, None if shift is None else {n: shift[n].to(device=device, dtype=params[n].dtype) for n in names})
    if sparse is not None and rule.perturbation not in SPARSE:
        raise ValueError(f"optimizer {spec!r} keeps no sparse mask (ssam-f and ssam-d do)")
    masks = None
    if rule.perturbation in SPARSE:
        sparse = sparse if sparse is not None else [SparseState() for _ in clients]
        if len(sparse) != num:
            raise ValueError(f"sparse must have one entry per client ({num}), got {len(sparse)}")
        masks = _SparseMasks(rule, sparse, params, sparse_round)
    if not 0 <= global_weight <= 1:  # as GlobalFlatSAM.load_global
        raise ValueError(f"kappa must be in [0, 1], got {global_weight}")
    pull = None
    if global_point is not None and global_weight != 0:
        pull = ({n: global_point[n].to(device) for n in names}, float(global_weight))
    autocast = (torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=not cuda_graph)
                if autocast_dtype is not None else contextlib.nullcontext())

    was_training = model.training
    model.train()

    def loss_of(p: Tensors, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        with autocast:  # as in train_locally: the loss too, which autocast computes in float32
            logits = functional_call(model, ({**p, **frozen}, buffers), (x,))
            losses = F.cross_entropy(logits, y, reduction="none")
        loss = (losses * w).sum() / w.sum().clamp_min(1.0)
        correct = ((logits.argmax(dim=1) == y).to(w.dtype) * w).sum()
        return loss, correct

    gradient = vmap(grad_and_value(loss_of, has_aux=True))

    def example_loss(p: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One example's loss, outside autocast: what SSAM-F's Fisher score squares the gradient of."""
        return F.cross_entropy(functional_call(model, ({**p, **frozen}, buffers), (x[None],)), y[None])

    example_gradients = vmap(grad(example_loss), in_dims=(None, 0, 0))

    loss_sum = torch.zeros(num, device=device, dtype=torch.float64)
    correct_sum = torch.zeros(num, device=device, dtype=torch.float64)
    static: Tensors = {}  # this step's inputs, refilled in place so a CUDA graph can replay the step

    def step(refresh: list[int] | None = None) -> None:
        x, y, w = static["x"], static["y"], static["w"]
        at = _combine(params, fixed) if fixed is not None else params  # lesam's one pass is at w + ε
        g, (loss, correct) = gradient(at, x, y, w)
        loss_sum.add_(loss.detach().double() * static["count"].double())
        correct_sum.add_(correct.double())
        if masks is not None:
            g = masks.descent_gradient(gradient, params, g, x, y, w, refresh)
        else:
            g = _descent_gradient(rule, rho, gradient, params, g, x, y, w, weights_nd, pull, dual, static["active"])
        if mix is not None:
            g = {n: momentum_alpha * g[n] + (1.0 - momentum_alpha) * mix[n] for n in names}
        if bias is not None:
            g = {n: g[n] + bias[n] for n in names}
        if direction_decay != 0:
            g = {n: g[n].add(params[n], alpha=direction_decay) for n in names}
        if grad_clip > 0:
            norm = torch.stack([v.flatten(1).norm(dim=1) for v in g.values()]).norm(dim=0)
            g = _scaled(g, (grad_clip / (norm + 1e-6)).clamp(max=1.0))
        _sgd_(rule, params, velocity, g, static["active"])

    graph = GraphedStep(step, device, enabled=cuda_graph and masks is None)
    for epoch in range(epochs):
        for k, (x, y, w) in enumerate(data.epoch()):
            inputs = {"x": x, "y": y, "w": w, "active": data.active[k], "count": data.counts[k]}
            if not static:
                static.update({name: t.clone() for name, t in inputs.items()})
            for name, t in inputs.items():
                static[name].copy_(t)
            due = masks.due(epoch) if masks is not None and k == 0 else []  # every client has a first step
            if due and masks.dynamic:
                step(due)  # SSAM-D refreshes inside the step
            else:
                graph()
            if due and not masks.dynamic:
                masks.refresh_fisher(due, example_gradients)  # SSAM-F after it, at the updated weights
    if not was_training:
        model.eval()
    if masks is not None:
        masks.write_back(epochs)
    if duals is not None and dual is not None:
        duals[:] = [{n: u[c] for n, u in dual[0].items()} for c in range(num)]

    steps = [epochs * len(c) for c in clients]
    seen = [epochs * len(c.images) for c in clients]
    loss_mean = (loss_sum / torch.tensor(seen, device=device)).tolist()
    accuracy = (correct_sum / torch.tensor(seen, device=device)).tolist()
    seconds = time.perf_counter() - start
    results = []
    for c, client in enumerate(clients):
        state = {n: params[n][c] if n in params else t.detach() for n, t in model.state_dict().items()}
        results.append((state, LocalResult(len(client.images), steps[c], loss_mean[c], accuracy[c], seconds)))
    return results


class _SparseMasks:
    """Sparse SAM's per-client masks, stacked like the weights (0/1 in their dtype), with the
    host-side schedule that says which clients refresh when (``fedsam.optim.ssam``'s rule)."""

    def __init__(self, rule: ClientRule, states: list[SparseState], params: Tensors, sparse_round: int) -> None:
        self.rule, self.states, self.params = rule, states, params
        self.dynamic = rule.perturbation == "sparse-dynamic"
        first = next(iter(params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.shapes = {n: v.shape[1:] for n, v in params.items()}
        self.size = sum(v[0].numel() for v in params.values())
        self.generators = [s.generator if s.generator is not None else
                           torch.Generator().manual_seed(rule.seed) if rule.seed is not None else None for s in states]
        if self.dynamic and rule.total_epochs is None:
            raise ValueError("SSAM-D's drop rate needs total_epochs (the number of rounds T in a federation)")
        if self.dynamic and any(g is None for g in self.generators):
            raise ValueError("batched ssam-d needs each client's generator (SparseState.generator) or a seed: "
                             "torch's global RNG would be drawn in another order than one client at a time")
        self.drop_rate = ssam.drop_rate_at(rule.drop_rate, sparse_round, rule.total_epochs) if self.dynamic else None
        flat = []
        for state, generator in zip(states, self.generators):
            if state.mask is not None:
                for n, shape in self.shapes.items():
                    if n not in state.mask or tuple(state.mask[n].shape) != tuple(shape):
                        raise ValueError(f"a client's sparse mask has no {n!r} of shape {tuple(shape)}")
                flat.append(torch.cat([state.mask[n].reshape(-1).to(self.device) for n in self.shapes]) != 0)
            elif self.dynamic:
                initial = ssam.perturbed_count(self.size, rule.sparsity)
                flat.append(ssam.top_mask(ssam.random_scores(self.size, generator), initial).to(self.device))
            else:  # SSAM-F starts with no entry perturbed
                flat.append(torch.zeros(self.size, dtype=torch.bool, device=self.device))
        self.masks = {n: torch.zeros_like(v) for n, v in params.items()}
        self._set(torch.arange(len(states), device=self.device), torch.stack(flat))

    def due(self, epoch: int) -> list[int]:
        """The clients whose mask refreshes at the first step of this round's local epoch ``epoch``."""
        return [c for c, s in enumerate(self.states) if ssam.refresh_due(s.epoch + epoch, self.rule.update_freq)]

    def descent_gradient(self, gradient, params: Tensors, g: Tensors, x: torch.Tensor, y: torch.Tensor,
                         w: torch.Tensor, refresh: list[int] | None) -> Tensors:
        """The gradient at each client's ``w + ε``, ``ε = ρ·(m ⊙ g)/(‖g‖ + ξ)`` (or ``‖m ⊙ g‖``: the
        ``masked`` norm); the clients in ``refresh`` then regrow their SSAM-D masks, between the passes."""
        masked = {n: g[n] * self.masks[n] for n in g}
        norm = _per_client(masked if self.rule.ssam_norm == "masked" else g, torch.square).sqrt()
        eps = _scaled(masked, self.rule.rho / (norm + XI))
        if refresh:
            self._regrow(refresh, g)
        return gradient(_combine(params, eps), x, y, w)[0]

    def _regrow(self, due: list[int], g: Tensors) -> None:
        rows = torch.tensor(due, device=self.device)
        old = self._flat(self.masks, rows) != 0

        def scores(kind: str) -> torch.Tensor:
            if kind == "random":  # each client's own generator, as its optimizer would draw
                return torch.stack([ssam.random_scores(self.size, self.generators[c]) for c in due]).to(self.device)
            return self._flat(g if kind == "gradient" else self.params, rows).abs()  # "weight": w, not w + ε

        death = scores(self.rule.death)  # drawn first, as the rule reads
        keep, grow = ssam.dynamic_counts(self.size, self.rule.sparsity, self.drop_rate)
        self._set(rows, ssam.regrown(old, death, scores(self.rule.growth), keep, grow))

    def refresh_fisher(self, due: list[int], example_gradients) -> None:
        """SSAM-F: each due client's mask becomes the top ``⌊P(1 − s)⌋`` of ``Σ_j (∇ℓ_j)²`` over
        its next ``num_samples`` examples, at its current weights."""
        chunk = max(1, FISHER_CHUNK_ENTRIES // self.size)
        keep = ssam.perturbed_count(self.size, self.rule.sparsity)
        for c in due:
            examples = self.states[c].examples
            if examples is None:
                raise ValueError("SSAM-F needs each client's Fisher examples (SparseState.examples)")
            x, y = examples.take(self.rule.num_samples)
            point = {n: v[c] for n, v in self.params.items()}
            fisher = {n: torch.zeros_like(v) for n, v in point.items()}
            for start in range(0, len(y), chunk):
                for n, v in example_gradients(point, x[start:start + chunk], y[start:start + chunk]).items():
                    fisher[n].add_(v.square().sum(0))
            scores = torch.cat([fisher[n].reshape(-1) for n in self.shapes])
            self._set(torch.tensor([c], device=self.device), ssam.top_mask(scores, keep)[None])

    def write_back(self, epochs: int) -> None:
        """Each client's mask and epoch count after the round, into its ``SparseState``."""
        for c, state in enumerate(self.states):
            state.mask = {n: m[c] != 0 for n, m in self.masks.items()}
            state.epoch += epochs

    def _flat(self, values: Tensors, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([values[n].index_select(0, rows).flatten(1) for n in self.shapes], 1)

    def _set(self, rows: torch.Tensor, flat: torch.Tensor) -> None:
        pieces = flat.split([shape.numel() for shape in self.shapes.values()], dim=1)
        for (n, shape), piece in zip(self.shapes.items(), pieces):
            self.masks[n].index_copy_(0, rows, piece.view(len(rows), *shape).to(self.dtype))


def _stacked_corrections(corrections: list[Tensors | None] | None, params: Tensors, num: int) -> Tensors | None:
    """Each client's ``b`` stacked along the client dimension (zeros for a client without one), or
    ``None`` when no client has one."""
    if corrections is None:
        return None
    if len(corrections) != num:
        raise ValueError(f"corrections must have one entry per client ({num}), got {len(corrections)}")
    if all(c is None for c in corrections):
        return None
    return {n: torch.stack([c[n].to(device=p.device, dtype=p.dtype) if c is not None else torch.zeros_like(p[0])
                            for c in corrections]) for n, p in params.items()}


def _descent_gradient(rule: ClientRule, rho: float | None, gradient, params: Tensors, g: Tensors,
                      x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, weights_nd: dict[str, bool],
                      pull: tuple[Tensors, float] | None = None,
                      dual: tuple[Tensors, Tensors | None] | None = None,
                      active: torch.Tensor | None = None) -> Tensors:
    """The gradient the descent step uses: ``g`` itself (SGD, and lesam's, already taken at its
    ``w + ε``), or the gradient at each client's ``w + ε`` (for gf-sam pulled towards ``w̃`` by κ:
    ``κ·w̃ + (1 − κ)·(w + ε)``; for dual-sam ε follows ``g − u − s`` and moves ``u``, for active
    clients only)."""
    if rule.perturbation in ("none", "fixed"):
        return g
    if rule.perturbation == "dual":
        u, s = dual
        corrected = {n: g[n] - u[n] - s[n] if s is not None else g[n] - u[n] for n in g}  # ĝ = g − u − s
        eps = _scaled(corrected, rho / (_per_client(corrected, torch.square).sqrt() + XI))
        for n, v in u.items():  # u ← u + ε − s
            moved = v + eps[n] - s[n] if s is not None else v + eps[n]
            v.copy_(torch.where(active.view(-1, *[1] * (v.ndim - 1)), moved, v))
        return gradient(_combine(params, eps), x, y, w)[0]
    if rule.perturbation in ("sam", "asam", "global-flat"):
        eps = dict(g)
        scale = {}
        if rule.perturbation == "asam":
            scale = {n: params[n].abs() + rule.eta for n in g if weights_nd[n]}
            eps.update({n: eps[n] * s for n, s in scale.items()})  # T g
        norm = _per_client(eps, torch.square).sqrt()
        eps.update({n: eps[n] * s for n, s in scale.items()})  # T² g
        eps = _scaled(eps, rho / (norm + XI))
        point = _combine(params, eps)
        if pull is not None:
            target, kappa = pull
            point = {n: (v * (1.0 - kappa)).add_(target[n], alpha=kappa) for n, v in point.items()}
        return gradient(point, x, y, w)[0]
    # fgsm: k sign-gradient ascent steps inside the L∞ ball, per client
    eps = {n: torch.zeros_like(v) for n, v in g.items()}
    ascent = {n: torch.zeros_like(v) for n, v in g.items()} if rule.ascent_momentum > 0 else None
    h = g
    for j in range(rule.steps):
        if j > 0:
            h = gradient(_combine(params, eps), x, y, w)[0]
        if ascent is not None:
            l1 = _per_client(h, torch.abs)
            ascent = _combine(_scaled(ascent, torch.full_like(l1, rule.ascent_momentum)),
                              _scaled(h, 1.0 / (l1 + XI)))
            direction = {n: torch.sign(v) for n, v in ascent.items()}
        else:
            direction = {n: torch.sign(v) for n, v in h.items()}
        eps = {n: (eps[n] + (rho / rule.steps) * direction[n]).clamp(-rho, rho) for n in eps}
    return gradient(_combine(params, eps), x, y, w)[0]


def _sgd_(rule: ClientRule, params: Tensors, velocity: Tensors | None, g: Tensors, active: torch.Tensor) -> None:
    """``torch.optim.SGD``'s step (weight decay, then momentum from a zero buffer), in place, for
    active clients only: a client without a batch this step keeps its weights and momentum."""
    for n, p in params.items():
        mask = active.view(-1, *[1] * (p.ndim - 1))
        d = g[n] + rule.weight_decay * p if rule.weight_decay != 0 else g[n]
        if velocity is not None:
            velocity[n].copy_(torch.where(mask, rule.momentum * velocity[n] + d, velocity[n]))
            d = velocity[n]
        p.copy_(torch.where(mask, p - rule.lr * d, p))
