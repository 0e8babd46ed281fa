"""Sparse SAM (SSAM-F, SSAM-D) against algorithms-family.md, section 13."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsam.optim import SAM, OptimizerSpecError, SparseSAM, build
from tests import reference as ref
from tests.test_optim import SGD_KW, Problem

P = 43  # entries of Problem's MLP: 4·5 + 5 + 5·3 + 3


def ssam(prob, mode="dynamic", sparsity=0.2, seed=0, **kw):
    kw = {**SGD_KW, **kw}
    return SparseSAM(prob.model.parameters(), torch.optim.SGD, sparsity=sparsity, mode=mode,
                     generator=torch.Generator().manual_seed(seed), **kw)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def live(opt):
    return int(flat(opt.mask()).sum())


def example_loss(prob):
    """The loss of the j-th of Problem's examples alone (a fixed, known set for the Fisher score)."""
    def loss(j):
        return nn.functional.cross_entropy(prob.model(prob.x[j:j + 1]), prob.y[j:j + 1])
    return loss


# -- the limits: s = 0 is SAM, s = 1 is the base optimizer ------------------------------------------


@pytest.mark.parametrize("mode", ["fisher", "dynamic"])
def test_sparsity_zero_is_sam_step_for_step(mode):
    a, b = Problem(), Problem()
    sam = SAM(a.model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    # dynamic: all-ones initial mask, refreshed every epoch with r = 0 (keeps all); fisher: all ones loaded
    opt = ssam(b, mode, sparsity=0.0, rho=0.05, steps_per_epoch=1, update_freq=1, total_epochs=3, drop_rate=0.0,
               fisher_loss=example_loss(b), num_samples=4)
    if mode == "fisher":
        opt.load_mask([torch.ones_like(p, dtype=torch.bool) for p in b.model.parameters()])
    for _ in range(5):
        sam.step(a.closure(sam))
        opt.step(b.closure(opt))
        assert torch.equal(a.flat(), b.flat())
        assert live(opt) == P


@pytest.mark.parametrize("norm", ["full", "masked"])
def test_sparsity_one_is_the_base_step_with_two_passes(norm):
    prob = Problem()
    opt = ssam(prob, "dynamic", sparsity=1.0, norm=norm)
    assert live(opt) == 0
    w = prob.flat()
    base = ref.SGDRef(**SGD_KW)
    for step in range(3):
        opt.step(prob.closure(opt))
        assert prob.calls == 2 * (step + 1)
        assert torch.equal(prob.seen[-1], prob.seen[-2])  # ε = 0: the second pass is at w
        w = base.step(w, ref.grad(prob.flat_loss, w))
        torch.testing.assert_close(prob.flat(), w, atol=1e-12, rtol=0)


# -- the perturbation ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["full", "masked"])
def test_masked_perturbation_and_its_norm(norm):
    prob = Problem()
    opt = ssam(prob, "dynamic", sparsity=0.5, rho=0.05, norm=norm)
    m = flat(opt.mask()).double()
    w = prob.flat()
    g = ref.grad(prob.flat_loss, w)
    opt.step(prob.closure(opt))
    eps = prob.seen[1] - prob.seen[0]
    denominator = g.norm() if norm == "full" else (m * g).norm()
    torch.testing.assert_close(eps, 0.05 * m * g / (denominator + 1e-12), atol=1e-14, rtol=0)
    if norm == "masked":
        assert eps.norm().item() == pytest.approx(0.05, abs=1e-12)
    else:
        assert eps.norm().item() < 0.05
    assert torch.all(eps[m == 0] == 0)


# -- SSAM-F ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,keep", [(0.0, 43), (0.1, 38), (0.2, 34), (0.3, 30), (0.5, 21), (0.9, 4),
                                           (1.0, 0)])
def test_fisher_mask_cardinality(sparsity, keep):
    """⌊P·(1 − s)⌋ entries after a refresh; all zeros before the first."""
    prob = Problem()
    opt = ssam(prob, "fisher", sparsity=sparsity)
    assert live(opt) == 0
    opt.refresh_fisher(example_loss(prob), 6)
    assert live(opt) == keep


def test_counts_use_the_decimal_sparsity_not_its_float_product():
    """P = 10, s = 0.8: 10·(1 − 0.8) is 1.999… in floats; the spec's ⌊P·(1 − s)⌋ is 2."""
    model = nn.Linear(9, 1).double()
    assert math.floor(10 * (1 - 0.8)) == 1
    fisher = SparseSAM(model.parameters(), torch.optim.SGD, sparsity=0.8, mode="fisher", lr=0.1)
    x = torch.randn(4, 9, dtype=torch.float64)
    fisher.refresh_fisher(lambda j: model(x[j:j + 1]).square().sum(), 4)
    dynamic = SparseSAM(model.parameters(), torch.optim.SGD, sparsity=0.8, mode="dynamic", lr=0.1)
    assert live(fisher) == live(dynamic) == 2


def test_fisher_mask_is_the_exact_top_k_of_summed_squared_example_gradients():
    """ℓ_j = ½(x_j·w + b − y_j)² has ∇ℓ_j = r_j·(x_j, 1), r_j the residual: the score is Σ_j r_j²·(x_j², 1)."""
    torch.manual_seed(3)
    lin = nn.Linear(11, 1).double()
    x, y = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    opt = SparseSAM(lin.parameters(), torch.optim.SGD, sparsity=0.5, mode="fisher", lr=0.1)
    for p in lin.parameters():
        p.grad = torch.full_like(p, 100.0)  # a stale gradient that must not enter the score

    def loss(j):
        return 0.5 * (lin(x[j:j + 1]).squeeze() - y[j]) ** 2

    opt.refresh_fisher(loss, 5)
    w, b = lin.weight.detach().reshape(-1), lin.bias.detach()
    residual = x @ w + b - y
    score = torch.cat([(residual[:, None] ** 2 * x ** 2).sum(0), (residual ** 2).sum().reshape(1)])
    expected = torch.zeros(12, dtype=torch.bool)
    expected[score.topk(6).indices] = True  # ⌊12·0.5⌋
    assert torch.equal(flat(opt.mask()).bool(), expected)
    assert all(p.grad is None for p in lin.parameters())  # zeroed after the last example


def test_fisher_schedule_refreshes_after_the_first_step_of_every_f_th_epoch():
    prob = Problem()
    calls = []
    example = example_loss(prob)

    def counted(j):
        calls.append(len(prob.seen))
        return example(j)

    opt = ssam(prob, "fisher", sparsity=0.5, steps_per_epoch=2, update_freq=2, fisher_loss=counted, num_samples=3)
    for step in range(9):
        before = flat(opt.mask())
        w = prob.flat()
        opt.step(prob.closure(opt))
        eps = prob.seen[-1] - prob.seen[-2]
        assert torch.all(eps[before == 0] == 0)  # the step perturbs with the mask it started with
        if step == 0:
            assert torch.equal(eps, torch.zeros_like(eps))  # initial mask all zeros: plain base step
        assert not torch.equal(prob.flat(), w)
    # epochs 0, 2, 4 start at steps 0, 4, 8: each refresh runs after its step's two passes
    assert calls == [2] * 3 + [10] * 3 + [18] * 3
    assert live(opt) == 21 and opt.epoch == 4


def test_fisher_refresh_scores_the_updated_weights():
    a, b = Problem(), Problem()
    auto = ssam(a, "fisher", sparsity=0.7, steps_per_epoch=1, update_freq=1, fisher_loss=example_loss(a),
                num_samples=5)
    manual = ssam(b, "fisher", sparsity=0.7)
    auto.step(a.closure(auto))
    manual.step(b.closure(manual))
    manual.refresh_fisher(example_loss(b), 5)
    assert torch.equal(flat(auto.mask()), flat(manual.mask()))
    assert torch.equal(a.flat(), b.flat())


def test_scheduled_fisher_refresh_without_examples_is_a_clear_error():
    prob = Problem()
    opt = ssam(prob, "fisher", steps_per_epoch=1)
    with pytest.raises(ValueError, match="fisher_loss"):
        opt.step(prob.closure(opt))


# -- SSAM-D ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,rate,initial,after", [
    # P − ⌈P·s⌉;  min(⌊(P − P·s)(1 − r)⌋, live) + ⌊min((P − P·s)·r, P·s)⌋
    (0.0, 0.3, 43, 30 + 0),
    (0.1, 0.25, 38, 29 + 4),
    (0.3, 0.5, 30, 15 + 12),
    (0.5, 0.2, 21, 17 + 4),
    (0.77, 0.4, 9, 5 + 3),
    (1.0, 0.5, 0, 0),
])
def test_dynamic_mask_cardinalities_and_where_they_come_from(sparsity, rate, initial, after):
    prob = Problem()
    opt = ssam(prob, "dynamic", sparsity=sparsity, steps_per_epoch=1, total_epochs=10, update_freq=1)
    assert live(opt) == initial
    old = flat(opt.mask()).bool()
    opt.set_epoch(0, steps_per_epoch=1, drop_rate=rate)
    opt.step(prob.closure(opt))
    new = flat(opt.mask()).bool()
    assert int(new.sum()) == after
    dense = P * (1 - sparsity)
    assert int((new & old).sum()) == min(math.floor(dense * (1 - rate) + 1e-9), initial)  # deaths among old
    assert int((new & ~old).sum()) == math.floor(min(dense * rate, P * sparsity) + 1e-9)  # growth among old zeros


def test_dynamic_refresh_inside_the_step_old_mask_now_new_mask_next():
    prob = Problem()
    opt = ssam(prob, "dynamic", sparsity=0.5, steps_per_epoch=3, update_freq=1, total_epochs=4)
    masks = [flat(opt.mask())]
    for _ in range(7):
        opt.step(prob.closure(opt))
        eps = prob.seen[-1] - prob.seen[-2]
        assert torch.all(eps[masks[-1] == 0] == 0)
        assert int((eps != 0).sum()) == int(masks[-1].sum())
        masks.append(flat(opt.mask()))
    changed = [not torch.equal(masks[i], masks[i + 1]) for i in range(7)]
    assert changed == [True, False, False, True, False, False, True]  # steps 0, 3, 6 start epochs 0, 1, 2


def test_dynamic_weight_scores_read_w_not_w_plus_eps():
    """The spec's "weight" score is |w|; the reference reads |w + ε|. Near-tied |w| on the perturbed
    entries and a large ρ make the two rankings keep different entries, so this tells them apart
    (growth reads entries where ε = 0, so only the death ranking can differ)."""
    prob = Problem()
    sparsity, rho, rate = 0.5, 2.0, 0.5
    opt = ssam(prob, "dynamic", sparsity=sparsity, rho=rho, death="weight", growth="weight")
    g = torch.Generator().manual_seed(1)
    sizes = [p.numel() for p in prob.model.parameters()]
    old = torch.zeros(P, dtype=torch.bool)
    old[torch.randperm(P, generator=g)[:21]] = True  # P − ⌈P·s⌉ = 21 perturbed
    w = prob.flat()
    # perturbed entries: |w| = 0.5 + 1e-4·k (k = 0..20 shuffled), random signs; the others keep theirs
    signs = torch.randint(0, 2, (21,), generator=g, dtype=torch.float64) * 2 - 1
    w[old] = signs * (0.5 + 1e-4 * torch.randperm(21, generator=g, dtype=torch.float64))
    with torch.no_grad():
        for p, piece in zip(prob.model.parameters(), w.split(sizes)):
            p.copy_(piece.view_as(p))
    opt.load_mask([piece.view_as(p) for piece, p in zip(old.split(sizes), prob.model.parameters())])
    opt.set_epoch(0, steps_per_epoch=1, drop_rate=rate)
    grad = ref.grad(prob.flat_loss, w)
    eps = rho * torch.where(old, grad, 0) / (grad.norm() + 1e-12)  # norm="full"
    opt.step(prob.closure(opt))
    assert torch.allclose(prob.seen[-1] - prob.seen[-2], eps, rtol=0, atol=1e-12)  # the ε the step applied

    dense = P * (1 - sparsity)  # 21.5: keep ⌊10.75⌋ = 10, grow ⌊min(10.75, 21.5)⌋ = 10
    keep, grow = math.floor(dense * (1 - rate)), math.floor(min(dense * rate, P * sparsity))
    assert (keep, grow) == (10, 10)

    def by_hand(score):
        mask = torch.zeros(P, dtype=torch.bool)
        mask[score.masked_fill(~old, -1).topk(keep).indices] = True
        mask[score.masked_fill(old, -1).topk(grow).indices] = True
        return mask

    spec, quirk = by_hand(w.abs()), by_hand((w + eps).abs())
    assert int((spec != quirk).sum()) >= 4  # the situation separates |w| from |w + ε|
    assert torch.equal(flat(opt.mask()).bool(), spec)


def test_dynamic_gradient_death_keeps_the_largest_gradients():
    prob = Problem()
    opt = ssam(prob, "dynamic", sparsity=0.2, steps_per_epoch=1, update_freq=1, total_epochs=2)
    old = flat(opt.mask()).bool()
    g = ref.grad(prob.flat_loss, prob.flat()).abs()
    opt.step(prob.closure(opt))
    kept = flat(opt.mask()).bool() & old
    expected = torch.zeros(P, dtype=torch.bool)
    expected[g.masked_fill(~old, -1).topk(math.floor(43 * 0.8 * 0.5)).indices] = True
    assert torch.equal(kept, expected)


def test_a_refresh_never_keeps_more_than_are_perturbed_now():
    """A mask carried from an earlier round may hold fewer entries than the rule keeps: all of
    them stay, and the growth comes on top."""
    prob = Problem()
    opt = ssam(prob, "dynamic", sparsity=0.2, drop_rate=0.5, steps_per_epoch=1, update_freq=1, total_epochs=10)
    few = torch.zeros(P, dtype=torch.bool)
    few[[0, 7, 30]] = True
    opt.load_mask([piece.view_as(p) for piece, p in zip(few.split([p.numel() for p in prob.model.parameters()]),
                                                         prob.model.parameters())])
    opt.set_epoch(0, steps_per_epoch=1, drop_rate=0.5)  # keep ⌊34.4·0.5⌋ = 17 > 3; grow ⌊min(17.2, 8.6)⌋ = 8
    opt.step(prob.closure(opt))
    new = flat(opt.mask()).bool()
    assert torch.equal(new & few, few)
    assert int(new.sum()) == 3 + 8


def test_regrow_caps_each_client_at_its_own_count():
    """``regrown`` over stacked clients: each row keeps at most the entries it perturbs now."""
    from fedsam.optim.ssam import regrown

    g = torch.Generator().manual_seed(0)
    old = torch.zeros(3, 20, dtype=torch.bool)
    old[0, :2] = True  # fewer than keep
    old[1, :12] = True  # more than keep
    death, growth = torch.rand(3, 20, generator=g, dtype=torch.float64), torch.rand(3, 20, generator=g,
                                                                                    dtype=torch.float64)
    new = regrown(old, death, growth, keep=5, grow=3)
    for row in range(3):
        kept = min(5, int(old[row].sum()))
        expected = torch.zeros(20, dtype=torch.bool)
        if kept:
            expected[death[row].masked_fill(~old[row], -1).topk(kept).indices] = True
        expected[growth[row].masked_fill(old[row], -1).topk(3).indices] = True
        assert torch.equal(new[row], expected), row
    assert new.sum(1).tolist() == [2 + 3, 5 + 3, 0 + 3]


def test_drop_rate_schedule():
    opt = ssam(Problem(), "dynamic", drop_rate=0.5, total_epochs=8)
    assert opt.drop_rate_at(0) == 0.5
    assert opt.drop_rate_at(2) == pytest.approx(0.5 * (1 + math.sqrt(0.5)) / 2, abs=1e-15)
    assert opt.drop_rate_at(4) == pytest.approx(0.25, abs=1e-15)
    assert opt.drop_rate_at(8) == 0.0


def test_initial_dynamic_mask_is_seeded():
    a, b, c = (ssam(Problem(), "dynamic", sparsity=0.5, seed=s) for s in (1, 1, 2))
    assert torch.equal(flat(a.mask()), flat(b.mask()))
    assert not torch.equal(flat(a.mask()), flat(c.mask()))


# -- the mask as client state ----------------------------------------------------------------------


def test_mask_and_epoch_carried_between_rounds_continue_identically():
    """One run of 4 epochs equals two 'rounds' of 2 epochs on fresh optimizers that load the mask."""
    kw = dict(sparsity=0.5, steps_per_epoch=2, update_freq=3, num_samples=4, lr=0.1, momentum=0.0,
              weight_decay=0.0)
    a, b = Problem(), Problem()
    whole = ssam(a, "fisher", fisher_loss=example_loss(a), **kw)
    for _ in range(8):
        whole.step(a.closure(whole))
    mask, epoch = None, 0
    for _ in range(2):
        client = ssam(b, "fisher", fisher_loss=example_loss(b), **kw)
        if mask is not None:
            client.load_mask(mask)
        client.set_epoch(epoch, steps_per_epoch=2)
        for _ in range(4):
            client.step(b.closure(client))
        mask, epoch = client.mask(), client.epoch
    assert epoch == 4
    assert torch.equal(a.flat(), b.flat())
    assert torch.equal(flat(whole.mask()), flat(mask))


def test_load_mask_checks_what_it_is_given():
    opt = ssam(Problem(), "fisher")
    shapes = [p.shape for p in opt.param_groups[0]["params"]]
    with pytest.raises(ValueError, match="tensors for"):
        opt.load_mask([torch.ones(s) for s in shapes[:-1]])
    with pytest.raises(ValueError, match="shape"):
        opt.load_mask([torch.ones(3) for _ in shapes])
    with pytest.raises(ValueError, match="0 or 1"):
        opt.load_mask([torch.full(s, 0.5) for s in shapes])


# -- hyperparameters and the registry ----------------------------------------------------------------


@pytest.mark.parametrize("kw,name", [
    (dict(sparsity=-0.1), "sparsity"), (dict(sparsity=1.5), "sparsity"), (dict(sparsity=float("nan")), "sparsity"),
    (dict(rho=-0.1), "rho"), (dict(mode="magic"), "mode"), (dict(norm="l1"), "norm"),
    (dict(update_freq=0), "update_freq"), (dict(num_samples=0), "num_samples"), (dict(drop_rate=1.5), "drop_rate"),
    (dict(death="age"), "death"), (dict(growth="age"), "growth"), (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(mode="dynamic", steps_per_epoch=5), "total_epochs"),
])
def test_bad_hyperparameters_raise_value_error_naming_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        SparseSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **kw)


@pytest.mark.parametrize("spec", ["ssam-f", "ssam-d"])
def test_registry_builds_and_trains(spec):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    opt = build(spec, model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, rho=None, sparsity=0.5,
                update_freq=1, total_epochs=10, seed=0, steps=3, num_samples=8)
    assert isinstance(opt, SparseSAM) and opt.mode == ("fisher" if spec == "ssam-f" else "dynamic")
    opt.fisher_loss = lambda j: nn.functional.cross_entropy(model(x[j:j + 1]), y[j:j + 1])
    opt.set_epoch(0, steps_per_epoch=4)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(40)]
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["rho"] == 0.05
    assert live(opt) <= 6  # ⌊12·0.5⌋


def test_a_bad_sparsity_through_build_names_the_spec_and_the_argument():
    with pytest.raises(OptimizerSpecError, match=r"'ssam-f'.*sparsity"):
        build("ssam-f", nn.Linear(2, 2).parameters(), lr=0.1, sparsity=2.0)
