"""SAM, ASAM and FGSM-SAM against the formulas in docs/algorithms.md, step for step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedsam.optim import FGSMSAM, SAM, FirstPassStats, l2_equivalent_rho
from tests import reference as ref


class Problem:
    """A small MLP on fixed data, with the same loss as a function of one flat vector."""

    def __init__(self, dtype=torch.float64, seed=0):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
        self.x = torch.randn(16, 4, generator=g, dtype=dtype)
        self.y = torch.randint(0, 3, (16,), generator=g)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]
        self.weight_mask = torch.cat(
            [torch.full((p.numel(),), p.ndim > 1) for p in self.model.parameters()]
        )
        self.calls = 0
        self.seen: list[torch.Tensor] = []

    def in_float64(self) -> "Problem":
        """The same weights and data in float64, for the reference side."""
        twin = Problem(torch.float64)
        twin.model.load_state_dict({k: v.double() for k, v in self.model.state_dict().items()})
        twin.x = self.x.double()
        twin.y = self.y.clone()
        return twin

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).clone()

    def flat_loss(self, w: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            params[name] = w[i:i + n].view(shape)
            i += n
        return F.cross_entropy(functional_call(self.model, params, (self.x,)), self.y)

    def closure(self, optimizer):
        def closure():
            self.calls += 1
            self.seen.append(self.flat())
            optimizer.zero_grad()
            loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            return loss
        return closure


SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("adaptive,rho,eta", [(False, 0.05, 0.0), (True, 0.5, 0.01), (True, 0.7, 0.2)])
def test_sam_and_asam_match_reference_step_for_step(dtype, tol, adaptive, rho, eta):
    prob = Problem(dtype)
    opt = SAM(prob.model.named_parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, **SGD_KW)
    w = prob.flat().double()
    base = ref.SGDRef(**SGD_KW)
    loss64 = prob.in_float64()
    for _ in range(6):
        opt.step(prob.closure(opt))
        g = ref.grad(loss64.flat_loss, w)
        eps = ref.sam_perturbation(g, w, rho, adaptive=adaptive, eta=eta, weight_mask=prob.weight_mask)
        w = base.step(w, ref.grad(loss64.flat_loss, w + eps))
        torch.testing.assert_close(prob.flat().double(), w, atol=tol, rtol=0)


def test_sam_perturbation_and_update_on_least_squares():
    """L(w) = ½‖Xw − y‖²/n has g = Xᵀ(Xw − y)/n: check ε and the update in closed form."""
    torch.manual_seed(1)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    lin = nn.Linear(3, 1, bias=False).double()
    w0 = lin.weight.detach().reshape(-1).clone()
    grad_at = lambda w: x.T @ (x @ w - y) / len(y)  # noqa: E731
    seen = []
    opt = SAM(lin.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)

    def closure():
        seen.append(lin.weight.detach().reshape(-1).clone())
        opt.zero_grad()
        loss = 0.5 * ((lin(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    g = grad_at(w0)
    eps = 0.1 * g / g.norm()
    torch.testing.assert_close(seen[1], w0 + eps, atol=1e-12, rtol=0)
    torch.testing.assert_close(lin.weight.detach().reshape(-1), w0 - 0.5 * grad_at(w0 + eps), atol=1e-12, rtol=0)


def test_asam_scales_weights_but_not_biases_in_closed_form():
    torch.manual_seed(2)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    lin = nn.Linear(3, 1).double()
    w0, b0 = lin.weight.detach().reshape(-1).clone(), lin.bias.detach().clone()
    seen = []
    opt = SAM(lin.named_parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.2, lr=0.1)

    def closure():
        seen.append((lin.weight.detach().reshape(-1).clone(), lin.bias.detach().clone()))
        opt.zero_grad()
        loss = 0.5 * ((lin(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    r = x @ w0 + b0 - y
    gw, gb = x.T @ r / len(y), r.mean().reshape(1)
    tw = w0.abs() + 0.2
    norm = torch.cat([tw * gw, gb]).norm()
    torch.testing.assert_close(seen[1][0], w0 + 0.5 * tw * tw * gw / norm, atol=1e-12, rtol=0)
    torch.testing.assert_close(seen[1][1], b0 + 0.5 * gb / norm, atol=1e-12, rtol=0)


def test_fgsm_single_step_perturbs_by_exactly_rho_sign_g():
    prob = Problem(torch.float32)
    rho = 1e-3
    opt = FGSMSAM(prob.model.parameters(), torch.optim.SGD, rho=rho, steps=1, lr=0.1)
    w = prob.flat()
    g = ref.grad(prob.flat_loss, w)
    opt.step(prob.closure(opt))
    assert prob.calls == 2
    assert torch.equal(prob.seen[1], w + rho * torch.sign(g))


@pytest.mark.parametrize("k,mu", [(2, 0.0), (3, 0.0), (4, 0.9), (3, 1.0)])
def test_fgsm_multi_step_matches_reference_stays_in_ball_and_counts_passes(k, mu):
    prob = Problem(torch.float64)
    rho = 0.01
    opt = FGSMSAM(prob.model.parameters(), torch.optim.SGD, rho=rho, steps=k, ascent_momentum=mu, **SGD_KW)
    w = prob.flat()
    base = ref.SGDRef(**SGD_KW)
    for _ in range(4):
        prob.calls, prob.seen = 0, []
        opt.step(prob.closure(opt))
        assert prob.calls == k + 1
        for seen in prob.seen[1:]:
            assert (seen - w).abs().max() <= rho * (1 + 1e-9)
        eps = ref.fgsm_perturbation(prob.flat_loss, w, rho, k, mu)
        torch.testing.assert_close(prob.seen[-1], w + eps, atol=1e-12, rtol=0)
        w = base.step(w, ref.grad(prob.flat_loss, w + eps))
        torch.testing.assert_close(prob.flat(), w, atol=1e-10, rtol=0)


def _run_split(opt, prob, fgsm_steps=0):
    closure = prob.closure(opt)
    closure()
    opt.first_step()
    for _ in range(max(fgsm_steps - 1, 0)):
        closure()
        opt.ascent_step()
    closure()
    opt.second_step()


@pytest.mark.parametrize("make,fgsm_steps", [
    (lambda p: SAM(p, torch.optim.SGD, rho=0.05, **SGD_KW), 0),
    (lambda p: SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **SGD_KW), 0),
    (lambda p: FGSMSAM(p, torch.optim.SGD, rho=0.01, steps=3, ascent_momentum=0.5, **SGD_KW), 3),
])
def test_step_with_closure_equals_first_and_second_step(make, fgsm_steps):
    a, b = Problem(torch.float32), Problem(torch.float32)
    opt_a, opt_b = make(a.model.named_parameters()), make(b.model.named_parameters())
    for _ in range(3):
        opt_a.step(a.closure(opt_a))
        _run_split(opt_b, b, fgsm_steps)
    assert torch.equal(a.flat(), b.flat())


def test_adam_as_the_base_optimizer():
    """SAM over Adam equals Adam fed the gradient at w + ε, found by the reference formula."""
    a, b = Problem(torch.float64), Problem(torch.float64)
    sam = SAM(a.model.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2, weight_decay=1e-3)
    adam = torch.optim.Adam(b.model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(5):
        sam.step(a.closure(sam))
        w = b.flat()
        eps = ref.sam_perturbation(ref.grad(b.flat_loss, w), w, 0.05)
        g_sam = ref.grad(b.flat_loss, w + eps)
        i = 0
        for p in b.model.parameters():
            p.grad = g_sam[i:i + p.numel()].view_as(p).clone()
            i += p.numel()
        adam.step()
        torch.testing.assert_close(a.flat(), b.flat(), atol=1e-10, rtol=0)


def test_param_groups_are_shared_so_schedulers_reach_the_base_step():
    prob = Problem()
    opt = SAM(prob.model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(prob.closure(opt))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_state_dict_round_trip_continues_identically():
    a, b = Problem(), Problem()
    opt_a = SAM(a.model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    for _ in range(2):
        opt_a.step(a.closure(opt_a))
    b.model.load_state_dict(a.model.state_dict())
    opt_b = SAM(b.model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read back from disk
    for _ in range(2):
        opt_a.step(a.closure(opt_a))
        opt_b.step(b.closure(opt_b))
    assert torch.equal(a.flat(), b.flat())


def test_per_group_rho_and_adaptive():
    prob = Problem()
    first, second = list(prob.model[0].parameters()), list(prob.model[2].parameters())
    opt = SAM([{"params": first, "rho": 0.2, "adaptive": True}, {"params": second}], torch.optim.SGD,
              rho=0.05, eta=0.1, lr=0.1)
    w = prob.flat()
    opt.step(prob.closure(opt))
    g = ref.grad(prob.flat_loss, w)
    n_first = sum(p.numel() for p in first)
    mask = prob.weight_mask.clone()
    mask[n_first:] = False  # only the first group is adaptive
    t = torch.where(mask, w.abs() + 0.1, torch.ones_like(w))
    rho = torch.cat([torch.full((n_first,), 0.2, dtype=torch.float64),
                     torch.full((len(w) - n_first,), 0.05, dtype=torch.float64)])
    expected = rho * t * t * g / (t * g).norm()
    torch.testing.assert_close(prob.seen[1], w + expected, atol=1e-12, rtol=0)


def test_fgsm_default_rho_is_the_l2_equivalent_of_sams_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    d = sum(p.numel() for p in model.parameters())
    opt = FGSMSAM(model.parameters(), torch.optim.SGD, steps=2, lr=0.05, momentum=0.9)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.05 / math.sqrt(d))
    assert l2_equivalent_rho(d) == pytest.approx(0.05 / math.sqrt(d))
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(60):
        losses.append(float(opt.step(closure).detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6, momentum=0.1)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.lin(x))))


@pytest.mark.parametrize("make,passes", [
    (lambda p: SAM(p, torch.optim.SGD, rho=0.5, lr=0.1), 2),
    (lambda p: FGSMSAM(p, torch.optim.SGD, rho=0.05, steps=3, lr=0.1), 4),
])
def test_batchnorm_running_stats_are_updated_once_per_step(make, passes):
    torch.manual_seed(3)
    model = BNNet()
    twin = BNNet()
    twin.load_state_dict(model.state_dict())
    opt = make(model.parameters())
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    counted = FirstPassStats(model, closure)
    for step in range(3):
        # The first pass sees the weights before this step: the twin reproduces its statistics.
        twin.load_state_dict({**twin.state_dict(), **{k: v for k, v in model.state_dict().items()
                                                      if not k.startswith("bn.running") and "num_batches" not in k}})
        twin.train()
        twin(x)
        counted.new_step()
        opt.step(counted)
        assert counted.passes == passes
        assert int(model.bn.num_batches_tracked) == step + 1
        torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean)
        torch.testing.assert_close(model.bn.running_var, twin.bn.running_var)


def test_without_the_guard_batchnorm_would_count_every_pass():
    """The reason for FirstPassStats: a bare closure counts each of SAM's passes."""
    torch.manual_seed(3)
    model = BNNet()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert int(model.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("call,name", [
    (lambda p: SAM(p, torch.optim.SGD, rho=float("inf"), lr=0.1), "rho"),
    (lambda p: SAM(p, torch.optim.SGD, rho=-1.0, lr=0.1), "rho"),
    (lambda p: SAM(p, torch.optim.SGD, rho=float("nan"), lr=0.1), "rho"),
    (lambda p: SAM(p, torch.optim.SGD, adaptive=True, eta=-0.1, lr=0.1), "eta"),
    (lambda p: FGSMSAM(p, torch.optim.SGD, rho=-0.1, lr=0.1), "rho"),
    (lambda p: FGSMSAM(p, torch.optim.SGD, steps=0, lr=0.1), "steps"),
    (lambda p: FGSMSAM(p, torch.optim.SGD, steps=1.5, lr=0.1), "steps"),
    (lambda p: FGSMSAM(p, torch.optim.SGD, ascent_momentum=-1.0, lr=0.1), "ascent_momentum"),
])
def test_bad_hyperparameters_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call(nn.Linear(2, 2).parameters())


def test_step_without_closure_is_a_clear_error():
    opt = SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


@pytest.mark.parametrize("scope,given", [("reference", "groups"), ("matrices", "groups"),
                                         ("reference", "named"), ("matrices", "bare")])
def test_asam_param_groups_scale_what_the_scope_names_step_for_step(scope, given):
    """``reference``: every tensor named weight (normalization weights too, as the ASAM/FedASAM
    code), biases not, from ``asam_param_groups`` or from ``model.named_parameters()`` alone (the
    default, algorithms.md); ``matrices``: ndim > 1 only, which bare parameters fall back to, with a
    warning, since they carry no names."""
    from fedsam.optim import asam_param_groups

    prob = Problem(torch.float64)
    prob.model = nn.Sequential(nn.Linear(4, 5), nn.GroupNorm(1, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    prob.names = [n for n, _ in prob.model.named_parameters()]
    prob.shapes = [p.shape for p in prob.model.parameters()]
    names = [n for n, p in prob.model.named_parameters() for _ in range(p.numel())]
    dims = [p.ndim for p in prob.model.parameters() for _ in range(p.numel())]
    mask = torch.tensor([n.endswith("weight") if scope == "reference" else d > 1 for n, d in zip(names, dims)])
    assert scope == "matrices" or mask.sum() > sum(p.numel() for p in prob.model.parameters() if p.ndim > 1)
    if given == "groups":
        opt = SAM(asam_param_groups(prob.model, scope), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **SGD_KW)
    elif given == "named":
        opt = SAM(prob.model.named_parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **SGD_KW)
    else:
        with pytest.warns(UserWarning, match="without names"):
            opt = SAM(prob.model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **SGD_KW)
    w, base = prob.flat(), ref.SGDRef(**SGD_KW)
    order = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(4):
        opt.step(prob.closure(opt))
        g = ref.grad(prob.flat_loss, w)
        eps = ref.sam_perturbation(g, w, 0.5, adaptive=True, eta=0.01, weight_mask=mask)
        w = base.step(w, ref.grad(prob.flat_loss, w + eps))
    assert len(order) == len(list(prob.model.parameters()))
    torch.testing.assert_close(prob.flat(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", ["sam", "asam", "fgsm-sam", "dual-sam", "ssam-d"])
def test_a_zero_radius_is_the_base_step_bit_for_bit_with_the_rules_passes(spec):
    """ρ = 0 perturbs by nothing, so the step is SGD's exactly (the spec's hooks FedGAMMA ≡
    SCAFFOLD, FedSpeed ≡ FedDyn, MoFedSAM ≡ FedCM rest on it); the passes are still taken."""
    from fedsam.optim import build

    a, b = Problem(torch.float64), Problem(torch.float64)
    options = dict(total_epochs=3, seed=0) if spec == "ssam-d" else {}
    opt = build(spec, a.model.named_parameters() if spec == "asam" else a.model.parameters(), rho=0.0,
                **SGD_KW, **options)
    sgd = torch.optim.SGD(b.model.parameters(), **SGD_KW)
    for _ in range(3):
        opt.step(a.closure(opt))
        sgd.step(b.closure(sgd))
    assert torch.equal(a.flat(), b.flat())
    assert a.calls == 2 * b.calls


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf")])
def test_a_negative_or_unbounded_radius_is_refused(rho):
    with pytest.raises(ValueError, match="rho must be >= 0"):
        SAM(Problem().model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)


def test_asam_takes_a_group_of_one_bare_tensor_as_torch_does():
    lin = nn.Linear(3, 2).double()
    with pytest.warns(UserWarning, match="without names"):  # the bias is 1-D: named or not, ASAM cannot tell
        opt = SAM([{"params": lin.weight}, {"params": lin.bias}], torch.optim.SGD, adaptive=True, lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
