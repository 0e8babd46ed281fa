"""Batched cohorts: many clients trained as one stacked model equal the clients trained one by one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsam.cohort import ClientRule, CohortBatches, batchable, train_cohort
from fedsam.data import DeviceBatches, SingleExamples
from fedsam.models import CaldarolaCNN
from fedsam.optim import build
from fedsam.optim.ssam import SparseState, load_client_state
from fedsam.train import train_locally

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
SIZES = (23, 40, 9)  # unequal: 3, 5 and 2 steps at batch 8 (short last batches, the third's of one sample)


class Small(nn.Module):
    """Conv, GroupNorm, pooling and two linear layers: every kind of layer the batched path maps."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.GroupNorm(2, 6), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _client_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 4, (n,), generator=g)


def _batches(i: int, n: int, batch: int = 8, seed: int | None = None) -> DeviceBatches:
    images, labels = _client_data(100 + i, n)
    return DeviceBatches(images, labels, batch, mean=MEAN, std=STD, augment=True, shuffle=True,
                         seed=7 + i if seed is None else seed, dtype=torch.float64)


RULES = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    ("sam", {"lr": 0.05, "rho": 0.1, "weight_decay": 5e-4}),
    ("sam", {"lr": 0.05, "rho": 0.1, "momentum": 0.5}),
    ("asam", {"lr": 0.05, "rho": 0.5, "eta": 0.01, "weight_decay": 1e-3}),
    ("fgsm-sam", {"lr": 0.05, "rho": 1e-3, "steps": 2}),
    ("fgsm-sam", {"lr": 0.05, "rho": 1e-3, "steps": 3, "ascent_momentum": 0.9}),
]


def _one_by_one(model, spec, options, epochs, corrections=None, **kwargs):
    out = []
    for i, n in enumerate(SIZES):
        local = copy.deepcopy(model)
        optimizer = build(spec, local.named_parameters(), **options)  # named: ASAM scales as the reference
        correction = corrections[i] if corrections is not None else None
        result = train_locally(local, optimizer, _batches(i, n), epochs, num_examples=n, correction=correction,
                               **kwargs)
        out.append((local.state_dict(), result))
    return out


def _assert_same(batched, sequential, rtol=1e-9):
    assert len(batched) == len(sequential)
    for (state_b, res_b), (state_s, res_s) in zip(batched, sequential):
        assert (res_b.num_examples, res_b.num_steps) == (res_s.num_examples, res_s.num_steps)
        assert res_b.loss == pytest.approx(res_s.loss, rel=1e-6)
        assert res_b.accuracy == pytest.approx(res_s.accuracy)
        for name, tensor in state_s.items():
            scale = tensor.abs().max().clamp_min(1e-30)
            assert ((state_b[name] - tensor).abs().max() / scale).item() < rtol, name


@pytest.mark.parametrize(("spec", "options"), RULES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(RULES)])
def test_batched_equals_one_client_at_a_time_in_float64(spec, options):
    torch.manual_seed(0)
    model = Small().double()
    batched = train_cohort(model, spec, options, [_batches(i, n) for i, n in enumerate(SIZES)], 2)
    _assert_same(batched, _one_by_one(model, spec, options, 2))


@pytest.mark.parametrize("spec", ["sgd", "sam"])
def test_batched_mofedsam_mix_and_clipping_equal_one_by_one(spec):
    torch.manual_seed(1)
    model = Small().double()
    momentum = {n: 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}
    options = {"lr": 0.05, "rho": 0.1, "weight_decay": 1e-3}
    kwargs = dict(grad_clip=0.5, global_momentum=momentum, momentum_alpha=0.1)
    batched = train_cohort(model, spec, options, [_batches(i, n) for i, n in enumerate(SIZES)], 2, **kwargs)
    _assert_same(batched, _one_by_one(model, spec, options, 2, **kwargs))


def _corrections(model, scale=0.3):
    """A different ``b`` for each client, and none for the second."""
    out = []
    for i in range(len(SIZES)):
        g = torch.Generator().manual_seed(50 + i)
        out.append(None if i == 1 else {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
                                        for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize(("spec", "options"), [
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    ("sam", {"lr": 0.05, "rho": 0.1, "weight_decay": 5e-4}),
], ids=["sgd", "sam"])
def test_batched_corrections_direction_decay_and_clipping_equal_one_by_one(spec, options):
    torch.manual_seed(4)
    model = Small().double()
    corrections = _corrections(model)
    kwargs = dict(grad_clip=0.5, direction_decay=0.05)
    batched = train_cohort(model, spec, options, [_batches(i, n) for i, n in enumerate(SIZES)], 2,
                           corrections=corrections, **kwargs)
    _assert_same(batched, _one_by_one(model, spec, options, 2, corrections=corrections, **kwargs))
    unclipped = train_cohort(model, spec, options, [_batches(i, n) for i, n in enumerate(SIZES)], 2,
                             corrections=corrections, direction_decay=0.05)
    name = next(iter(unclipped[0][0]))
    assert not torch.allclose(unclipped[0][0][name], batched[0][0][name])  # the clipping was active


@pytest.mark.parametrize("spec", ["sgd", "sam"])
def test_batched_corrections_with_the_momentum_mix_equal_one_by_one(spec):
    torch.manual_seed(5)
    model = Small().double()
    momentum = {n: 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}
    corrections = _corrections(model, scale=0.1)
    options = {"lr": 0.05, "rho": 0.1, "weight_decay": 1e-3}
    kwargs = dict(grad_clip=0.5, global_momentum=momentum, momentum_alpha=0.1, direction_decay=0.01)
    batched = train_cohort(model, spec, options, [_batches(i, n) for i, n in enumerate(SIZES)], 2,
                           corrections=corrections, **kwargs)
    _assert_same(batched, _one_by_one(model, spec, options, 2, corrections=corrections, **kwargs))


def test_no_corrections_at_all_is_no_correction():
    torch.manual_seed(6)
    model = Small().double()
    clients = lambda: [_batches(i, n) for i, n in enumerate(SIZES)]  # noqa: E731
    plain = train_cohort(model, "sgd", {"lr": 0.05}, clients(), 1)
    nones = train_cohort(model, "sgd", {"lr": 0.05}, clients(), 1, corrections=[None] * len(SIZES))
    for (a, _), (b, _) in zip(plain, nones):
        for name, tensor in a.items():
            assert torch.equal(tensor, b[name])
    with pytest.raises(ValueError, match="one entry per client"):
        train_cohort(model, "sgd", {"lr": 0.05}, clients(), 1, corrections=[None])


def test_the_caldarola_cnn_batches_exactly_too():
    torch.manual_seed(2)
    model = CaldarolaCNN(4).double()
    options = {"lr": 0.05, "rho": 0.1}
    batched = train_cohort(model, "sam", options, [_batches(i, n) for i, n in enumerate(SIZES)], 1)
    _assert_same(batched, _one_by_one(model, "sam", options, 1))


def test_a_client_whose_data_ran_out_stands_still():
    """With unequal sizes the short client's weight decay stops with its data: training it alone
    for its own steps gives the same weights, although the cohort ran more steps."""
    torch.manual_seed(3)
    model = Small().double()
    options = {"lr": 0.1, "weight_decay": 0.5, "momentum": 0.9}
    clients = [_batches(0, 40), _batches(1, 12)]  # 5 steps against 2
    (_, long_result), (short_state, short_result) = train_cohort(model, "sgd", options, clients, 1)
    assert (long_result.num_steps, short_result.num_steps) == (5, 2)
    alone = copy.deepcopy(model)
    train_locally(alone, build("sgd", alone.parameters(), **options), _batches(1, 12), 1)
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(short_state[name], tensor, rtol=1e-12, atol=0)


def test_the_cohort_leaves_the_model_as_it_was():
    model = Small().double()
    before = copy.deepcopy(model.state_dict())
    train_cohort(model, "sam", {"lr": 0.1}, [_batches(0, 16)], 1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_cohort_batches_are_each_clients_own_batches():
    clients = [_batches(i, n) for i, n in enumerate(SIZES)]
    alone = [list(_batches(i, n)) for i, n in enumerate(SIZES)]
    for k, (x, y, w) in enumerate(CohortBatches(clients).epoch()):
        for c, batches in enumerate(alone):
            if k < len(batches):
                real = int(w[c].sum())
                torch.testing.assert_close(x[c, :real], batches[k][0], rtol=0, atol=0)
                assert torch.equal(y[c, :real], batches[k][1])
                assert not w[c, real:].any()
            else:
                assert not w[c].any()


def test_rule_takes_the_factorys_defaults():
    assert ClientRule.of("sam", {"lr": 0.1}).rho == 0.05
    asam = ClientRule.of("asam", {"lr": 0.1, "rho": None})
    assert (asam.rho, asam.eta) == (0.5, 0.01)
    assert ClientRule.of("fgsm-sam", {"lr": 0.1, "steps": 2}).rho is None  # the model's L2-equivalent radius


def test_what_cannot_batch_says_why():
    assert batchable("sam", Small()) is None
    assert "plug-in" in batchable("torch.optim:Adam", Small())
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert "BatchNorm" in batchable("sgd", bn)
    assert batchable("ssam-f", Small()) is None and batchable("ssam-d", Small()) is None  # every built-in
    with pytest.raises(ValueError, match="no batched rule"):
        ClientRule.of("torch.optim:Adam", {"lr": 0.1})
    with pytest.raises(ValueError, match="cannot be batched"):
        train_cohort(Small(), "torch.optim:Adam", {"lr": 0.1}, [_batches(0, 8)], 1)
    with pytest.raises(ValueError, match="cannot be batched"):
        train_cohort(bn, "sgd", {"lr": 0.1}, [_batches(0, 8)], 1)


@pytest.mark.parametrize("scope", ["reference", "matrices"])
def test_batched_asam_scales_the_same_tensors_as_the_param_groups(scope):
    """The reference's ASAM scales GroupNorm weights too; both scopes batch exactly."""
    from fedsam.optim import asam_param_groups

    torch.manual_seed(5)
    model = Small().double()
    options = {"lr": 0.05, "rho": 0.5, "eta": 0.01, "weight_decay": 1e-3, "asam_scope": scope}
    batched = train_cohort(model, "asam", options, [_batches(i, n) for i, n in enumerate(SIZES)], 2)
    sequential = []
    for i, n in enumerate(SIZES):
        local = copy.deepcopy(model)
        optimizer = build("asam", asam_param_groups(local, scope), **options)
        sequential.append((local.state_dict(), train_locally(local, optimizer, _batches(i, n), 2, num_examples=n)))
    _assert_same(batched, sequential)


def _one_by_one_loaded(model, spec, options, load, **kwargs):
    """One client at a time, each optimizer handed its round's state by ``load(i, optimizer, params)``."""
    out = []
    for i, n in enumerate(SIZES):
        local = copy.deepcopy(model)
        optimizer = build(spec, local.parameters(), **options)
        load(i, optimizer)
        out.append((local.state_dict(), train_locally(local, optimizer, _batches(i, n), 2, num_examples=n, **kwargs)))
    return out


def test_batched_lesam_takes_each_clients_own_fixed_perturbation_exactly():
    """FedLESAM: client i's one pass per step is at ``w + ε_i``; a client without ``ε`` steps plainly."""
    torch.manual_seed(6)
    model = Small().double()
    names = [n for n, _ in model.named_parameters()]
    perturbations = _corrections(model, scale=0.05)  # ε_0, none for client 1, ε_2
    options = {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3}
    kwargs = dict(grad_clip=0.5, direction_decay=0.01)
    batched = train_cohort(model, "lesam", options, [_batches(i, n) for i, n in enumerate(SIZES)], 2,
                           perturbations=perturbations, **kwargs)

    def load(i, optimizer):
        e = perturbations[i]
        optimizer.load_perturbation(None if e is None else [e[n] for n in names])

    sequential = _one_by_one_loaded(model, "lesam", options, load, **kwargs)
    _assert_same(batched, sequential)
    plain = train_cohort(model, "lesam", options, [_batches(i, n) for i, n in enumerate(SIZES)], 2, **kwargs)
    assert torch.equal(plain[1][0]["head.3.weight"], batched[1][0]["head.3.weight"])  # client 1 had no ε
    assert not torch.equal(plain[0][0]["head.3.weight"], batched[0][0]["head.3.weight"])


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
def test_batched_gf_sam_pulls_towards_the_global_point_exactly(kappa):
    """FedGF: SAM's point pulled to ``κ·w̃ + (1 − κ)(w + ε)`` for every client of the cohort."""
    torch.manual_seed(7)
    model = Small().double()
    names = [n for n, _ in model.named_parameters()]
    point = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    options = {"lr": 0.05, "rho": 0.1, "weight_decay": 5e-4}
    batched = train_cohort(model, "gf-sam", options, [_batches(i, n) for i, n in enumerate(SIZES)], 2,
                           global_point=point, global_weight=kappa)
    sequential = _one_by_one_loaded(model, "gf-sam", options,
                                    lambda i, opt: opt.load_global([point[n] for n in names], kappa))
    _assert_same(batched, sequential)


@pytest.mark.parametrize("rho", [0.1, 0.0])
def test_batched_dual_sam_keeps_each_clients_dual_exactly(rho):
    """FedSMOO: client i perturbs along ``g − u_i − s`` and carries its ``u_i`` on; a client with
    fewer steps stops moving ``u_i`` when its data stops. ρ = 0 is the plain step (the test hook)."""
    torch.manual_seed(8)
    model = Small().double()
    names = [n for n, _ in model.named_parameters()]
    duals = _corrections(model, scale=0.02)  # u_0, none for client 1 (zero), u_2
    shift = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    options = {"lr": 0.05, "rho": rho, "momentum": 0.5, "weight_decay": 1e-3}
    kwargs = dict(grad_clip=0.5, direction_decay=0.01)
    carried = list(duals)
    batched = train_cohort(model, "dual-sam", options, [_batches(i, n) for i, n in enumerate(SIZES)], 2,
                           duals=carried, shift=shift, **kwargs)
    after = []

    def load(i, optimizer):
        u = duals[i]
        optimizer.load_duals(None if u is None else [u[n] for n in names], [shift[n] for n in names])
        after.append(optimizer)

    sequential = _one_by_one_loaded(model, "dual-sam", options, load, **kwargs)
    _assert_same(batched, sequential)
    for mine, optimizer in zip(carried, after, strict=True):
        for name, theirs in zip(names, optimizer.duals()):
            scale = theirs.abs().max().clamp_min(1e-30)
            assert ((mine[name] - theirs).abs().max() / scale).item() < 1e-9, name
    if rho == 0:  # ε = 0: u moves by −s per step, the weights as plain SGD's
        plain = train_cohort(model, "sgd", options, [_batches(i, n) for i, n in enumerate(SIZES)], 2, **kwargs)
        _assert_same(batched, plain)
        steps = [2 * len(_batches(i, n)) for i, n in enumerate(SIZES)]
        assert torch.allclose(carried[1]["head.3.bias"], -steps[1] * shift["head.3.bias"], rtol=1e-12)


def test_a_rule_refuses_the_state_of_another():
    with pytest.raises(ValueError, match="keeps no duals"):
        train_cohort(Small(), "sam", {"lr": 0.1}, [_batches(0, 8)], 1, duals=[None])
    with pytest.raises(ValueError, match="keeps no duals"):
        train_cohort(Small(), "sgd", {"lr": 0.1}, [_batches(0, 8)], 1,
                     shift={n: p.detach() for n, p in Small().named_parameters()})
    with pytest.raises(ValueError, match="no fixed perturbation"):
        train_cohort(Small(), "sam", {"lr": 0.1}, [_batches(0, 8)], 1, perturbations=[None])
    with pytest.raises(ValueError, match="keeps no sparse mask"):
        train_cohort(Small(), "sam", {"lr": 0.1}, [_batches(0, 8)], 1, sparse=[SparseState()])
    with pytest.raises(ValueError, match="no global point"):
        train_cohort(Small(), "lesam", {"lr": 0.1}, [_batches(0, 8)], 1,
                     global_point={n: p.detach() for n, p in Small().named_parameters()}, global_weight=0.5)


SPARSE_RULES = [
    ("ssam-f", {"lr": 0.05, "rho": 0.1, "sparsity": 0.9, "num_samples": 12, "update_freq": 2, "momentum": 0.5,
                "weight_decay": 1e-3}),
    ("ssam-f", {"lr": 0.05, "rho": 0.1, "sparsity": 0.9, "num_samples": 5, "update_freq": 1, "ssam_norm": "masked"}),
    ("ssam-d", {"lr": 0.05, "rho": 0.1, "sparsity": 0.9, "drop_rate": 0.8, "update_freq": 2, "total_epochs": 4,
                "momentum": 0.5, "weight_decay": 1e-3}),
    ("ssam-d", {"lr": 0.05, "rho": 0.1, "sparsity": 0.7, "drop_rate": 0.5, "update_freq": 1, "total_epochs": 4,
                "death": "weight", "growth": "gradient", "ssam_norm": "masked"}),
    ("ssam-d", {"lr": 0.05, "rho": 0.1, "sparsity": 0.5, "update_freq": 2, "total_epochs": 4, "death": "random"}),
]


@pytest.mark.parametrize(("spec", "options"), SPARSE_RULES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(SPARSE_RULES)])
def test_batched_sparse_sam_keeps_each_clients_mask_and_schedule_exactly(spec, options):
    """Sparse SAM batched: client 0 starts fresh (the mode's initial mask, epoch 0), clients 1 and
    2 bring a mask from an earlier round (with fewer or more entries than the rule keeps) and have
    trained 1 and 3 epochs before, so with f = 2 they refresh in different local epochs. Each must
    end with the weights, mask and epoch count its own ``SparseSAM`` reaches alone, through the
    ClientApp's own wiring (``load_client_state``)."""
    torch.manual_seed(9)
    model = Small().double()
    names = [n for n, _ in model.named_parameters()]
    epochs, sparse_round = 3, 1

    def given(i, share):
        g = torch.Generator().manual_seed(60 + i)
        return {n: torch.rand(p.shape, generator=g) < share for n, p in model.named_parameters()}

    def states():  # fresh objects each time: the generators and example streams are consumed
        brought = [(None, 0), (given(1, 0.03), 1), (given(2, 0.4), 3)]
        return [SparseState(mask, epoch, SingleExamples(_batches(i, n, batch=1, seed=40 + i)),
                            torch.Generator().manual_seed(80 + i))
                for i, ((mask, epoch), n) in enumerate(zip(brought, SIZES))]

    carried = states()
    batched = train_cohort(model, spec, options, [_batches(i, n) for i, n in enumerate(SIZES)], epochs,
                           sparse=carried, sparse_round=sparse_round)
    sequential, alone = [], []
    for i, (n, state) in enumerate(zip(SIZES, states())):
        local = copy.deepcopy(model)
        optimizer = build(spec, local.parameters(), **options)
        load_client_state(optimizer, local, state, names, len(_batches(i, n)), sparse_round)
        sequential.append((local.state_dict(), train_locally(local, optimizer, _batches(i, n), epochs, num_examples=n)))
        alone.append(optimizer)
    _assert_same(batched, sequential)
    for i, (mine, optimizer) in enumerate(zip(carried, alone, strict=True)):
        assert mine.epoch == optimizer.epoch == [0, 1, 3][i] + epochs
        for name, theirs in zip(names, optimizer.mask()):
            assert torch.equal(mine.mask[name], theirs.bool()), (i, name)
    flat = [torch.cat([s.mask[n].flatten() for n in names]) for s in carried]
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[1], flat[2])  # each client its own mask
    before = torch.cat([given(1, 0.03)[n].flatten() for n in names])
    assert not torch.equal(flat[1], before)  # client 1 refreshed (at its cumulative epoch 2)


def test_batched_ssam_d_draws_from_the_rules_seed_without_a_generator():
    """No generator given: every client draws from ``seed``, as ``build('ssam-d', seed=...)`` does."""
    torch.manual_seed(10)
    model = Small().double()
    options = {"lr": 0.05, "sparsity": 0.5, "update_freq": 1, "total_epochs": 2, "seed": 3}
    carried = [SparseState() for _ in SIZES]
    train_cohort(model, "ssam-d", options, [_batches(i, n) for i, n in enumerate(SIZES)], 1, sparse=carried)
    names = [n for n, _ in model.named_parameters()]
    for i, n in enumerate(SIZES):
        local = copy.deepcopy(model)
        optimizer = build("ssam-d", local.parameters(), **options)
        optimizer.set_epoch(0, steps_per_epoch=len(_batches(i, n)), drop_rate=optimizer.drop_rate_at(0))
        optimizer.generator = torch.Generator().manual_seed(3)  # the initial mask, drawn again from the seed
        optimizer.load_mask(None)
        train_locally(local, optimizer, _batches(i, n), 1)
        for name, theirs in zip(names, optimizer.mask()):
            assert torch.equal(carried[i].mask[name], theirs.bool())


def test_batched_sparse_sam_says_what_it_lacks():
    with pytest.raises(ValueError, match="Fisher examples"):
        train_cohort(Small().double(), "ssam-f", {"lr": 0.05}, [_batches(0, 16)], 1)
    with pytest.raises(ValueError, match="generator"):  # the global RNG's order would differ from one by one
        train_cohort(Small().double(), "ssam-d", {"lr": 0.05, "total_epochs": 2}, [_batches(0, 16)], 1)
    with pytest.raises(ValueError, match="total_epochs"):
        train_cohort(Small().double(), "ssam-d", {"lr": 0.05, "seed": 1}, [_batches(0, 16)], 1)
    state = torch.get_rng_state()
    ClientRule.of("ssam-d", {"lr": 0.05})  # checking the options draws nothing from the global RNG
    assert torch.equal(state, torch.get_rng_state())


def test_single_examples_continue_the_stream_across_calls_and_epochs():
    """SSAM-F's examples: one client's stream, epoch after epoch, never folded into pairs."""
    whole = SingleExamples(_batches(0, 9, batch=1, seed=5)).take(20)
    parts = SingleExamples(_batches(0, 9, batch=1, seed=5))
    pieces = [parts.take(k) for k in (1, 7, 12)]
    torch.testing.assert_close(torch.cat([x for x, _ in pieces]), whole[0], rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in pieces]), whole[1])
    as_batches = _batches(0, 9, batch=9, seed=5)  # the same generator's epochs, each as one batch
    first, second = next(iter(as_batches)), next(iter(as_batches))
    torch.testing.assert_close(whole[0][:9], first[0], rtol=0, atol=0)
    torch.testing.assert_close(whole[0][9:18], second[0], rtol=0, atol=0)  # reshuffled and re-augmented
    assert not torch.equal(whole[1][:9], whole[1][9:18])
