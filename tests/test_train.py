"""The local training loop: MoFedSAM's momentum mix, clipping, metrics, BatchNorm, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsam.data import DeviceBatches
from fedsam.optim import SAM, build
from fedsam.train import evaluate, train_locally
from tests import reference as ref


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g)


class Tiny(nn.Module):
    def __init__(self, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def _batches(images, labels, bs):
    return DeviceBatches(images, labels, bs, mean=(0.5,) * 3, std=(0.25,) * 3)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def _flat_loss(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(w):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = w[i:i + math.prod(shape)].view(shape).float()
            i += math.prod(shape)
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y).double()

    return loss


@pytest.mark.parametrize("spec", ["sgd", "sam"])
def test_momentum_mix_is_alpha_g_plus_one_minus_alpha_m(spec):
    torch.manual_seed(0)
    model = Tiny()
    images, labels = _data(8)
    batches = _batches(images, labels, 8)  # one step
    x, y = next(iter(batches))
    m = {name: torch.randn_like(p) * 0.1 for name, p in model.named_parameters()}
    m_flat = torch.cat([t.reshape(-1) for t in m.values()]).double()
    w = _flat(model)
    loss = _flat_loss(model, x, y)
    g = ref.grad(loss, w)
    if spec == "sam":
        g = ref.grad(loss, w + ref.sam_perturbation(g, w, 0.05))  # the perturbation uses the plain gradient
    alpha, lr = 0.3, 0.1
    opt = build(spec, model.parameters(), lr=lr, rho=0.05)
    result = train_locally(model, opt, batches, 1, global_momentum=m, momentum_alpha=alpha)
    assert result.num_steps == 1
    torch.testing.assert_close(_flat(model), w - lr * (alpha * g + (1 - alpha) * m_flat), atol=2e-6, rtol=0)


def test_gradient_clipping_bounds_the_descent_step():
    torch.manual_seed(0)
    model = Tiny()
    images, labels = _data(8)
    w = _flat(model)
    opt = build("sgd", model.parameters(), lr=1.0)
    train_locally(model, opt, _batches(images, labels, 8), 1, grad_clip=1e-3)
    assert (_flat(model) - w).norm() == pytest.approx(1e-3, rel=1e-4)


def test_clipping_applies_to_sams_final_gradient_not_its_ascent():
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    images, labels = _data(8)
    x, y = next(iter(_batches(images, labels, 8)))
    w = _flat(a)
    loss = _flat_loss(a, x, y)
    g = ref.grad(loss, w)
    g_sam = ref.grad(loss, w + ref.sam_perturbation(g, w, 0.5))
    clip = 0.01 * float(g_sam.norm())
    train_locally(a, SAM(a.parameters(), torch.optim.SGD, rho=0.5, lr=1.0), _batches(images, labels, 8), 1,
                  grad_clip=clip)
    torch.testing.assert_close(_flat(a), w - g_sam * clip / g_sam.norm(), atol=1e-6, rtol=0)


def test_metrics_count_steps_examples_and_first_pass_loss():
    torch.manual_seed(0)
    model = Tiny()
    images, labels = _data(23)
    before = Tiny()
    before.load_state_dict(model.state_dict())
    batches = _batches(images, labels, 10)  # batches of 10, 10 and 3
    opt = build("sam", model.parameters(), lr=0.0, rho=0.05)  # lr 0: weights never move
    result = train_locally(model, opt, batches, 2)
    assert result.num_steps == 2 * len(batches) and result.num_examples == 23
    expected = evaluate(before, _batches(images, labels, 23)).loss
    assert result.loss == pytest.approx(expected, rel=1e-5)  # loss at w, not at w + ε
    assert 0 <= result.accuracy <= 1 and result.seconds > 0


def test_batchnorm_counts_each_batch_once_in_the_loop():
    torch.manual_seed(0)
    model = Tiny(bn=True)
    images, labels = _data(30)
    opt = build("fgsm-sam", model.parameters(), lr=0.1, steps=3)
    result = train_locally(model, opt, _batches(images, labels, 10), 2)
    assert int(model.bn.num_batches_tracked) == result.num_steps == 6


def test_local_training_learns_a_separable_problem():
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    images = torch.zeros(60, 3, 32, 32, dtype=torch.uint8)
    for c in range(3):
        images[labels == c, c] = 255
    model = Tiny()
    opt = build("sam", model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    train_locally(model, opt, DeviceBatches(images, labels, 12, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True), 15)
    accuracy = evaluate(model, _batches(images, labels, 60)).accuracy
    assert accuracy == 1.0


def test_the_hook_is_removed_after_training():
    model = Tiny()
    images, labels = _data(8)
    opt = build("sam", model.parameters(), lr=0.1)
    train_locally(model, opt, _batches(images, labels, 8), 1, grad_clip=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)  # norm far above the clip
    opt.base_optimizer.step()  # after training: a plain SGD step, neither clipped nor mixed
    assert all(torch.allclose(p, b - 0.1 * 10.0) for p, b in zip(model.parameters(), before))


def test_a_restarted_builtin_optimizer_equals_a_fresh_one():
    """The client keeps one optimizer per worker; restart() must make it indistinguishable from new."""
    from fedsam.optim import restart

    torch.manual_seed(0)
    images, labels = _data(24)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    kept = build("sam", a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.05)
    for rnd, lr in enumerate((0.1, 0.05)):
        start = {k: v.clone() for k, v in a.state_dict().items()}
        b.load_state_dict(start)
        fresh = build("sam", b.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3, rho=0.05)
        if rnd:
            restart(kept, lr)
        train_locally(a, kept, DeviceBatches(images, labels, 8, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True,
                                             seed=rnd), 2)
        train_locally(b, fresh, DeviceBatches(images, labels, 8, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True,
                                              seed=rnd), 2)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bf16_autocast_keeps_weights_and_the_perturbation_in_float32():
    torch.manual_seed(0)
    model = Tiny()
    images, labels = _data(16)
    opt = build("sam", model.parameters(), lr=0.1, rho=0.05)
    seen = []
    opt.base_optimizer.register_step_pre_hook(lambda *a: seen.extend(s["e_w"].dtype for s in opt.state.values()))
    result = train_locally(model, opt, _batches(images, labels, 8), 1, autocast_dtype=torch.bfloat16)
    assert math.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert seen and set(seen) == {torch.float32}
    loss = evaluate(model, _batches(images, labels, 16), autocast_dtype=torch.bfloat16).loss
    assert math.isfinite(loss)
