"""The sharpness estimator against Hessians we know."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsam.sharpness import evaluation_subset, model_sharpness, top_eigenvalue
from tests.helpers import run_cli


def _spd(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_quadratic_top_eigenvalue():
    a = _spd([7.0, 3.0, 1.0, 0.5, 0.1])
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    value, steps, converged = top_eigenvalue([(lambda: 0.5 * w @ a @ w, 1.0)], [w], iters=200, tol=1e-9)
    assert value == pytest.approx(7.0, rel=1e-6) and steps < 200 and converged


def test_weighted_terms_add_their_hessians():
    a, b = _spd([4.0, 1.0, 0.2], seed=1), _spd([3.0, 2.0, 0.1], seed=2)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    value = top_eigenvalue([(lambda: 0.5 * w @ a @ w, 0.25), (lambda: 0.5 * w @ b @ w, 0.75)], [w],
                           iters=500, tol=1e-10).value
    assert value == pytest.approx(float(torch.linalg.eigvalsh(0.25 * a + 0.75 * b).max()), rel=1e-6)


def test_a_small_networks_sharpness_is_its_exact_hessians_top_eigenvalue():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(40, 3, 2, 2, dtype=torch.float64), torch.randint(0, 3, (40,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = w[i:i + math.prod(shape)].view(shape)
            i += math.prod(shape)
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    exact = torch.linalg.eigvalsh(torch.func.hessian(loss)(w0))
    top = float(exact.max())
    value = model_sharpness(model, x, y, batch_size=16, iters=500, tol=1e-10).value
    assert value == pytest.approx(top, rel=1e-5)
    assert model.training  # restored


def test_evaluation_subset_is_fixed_by_the_seed():
    assert torch.equal(evaluation_subset(100, 10, 3), evaluation_subset(100, 10, 3))
    assert not torch.equal(evaluation_subset(100, 10, 3), evaluation_subset(100, 10, 4))
    assert len(evaluation_subset(5, 10, 0)) == 5


def test_sharpness_command_on_a_saved_model(cifar10_dir, tmp_path, capsys):
    from fedsam.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("cnn", 10).state_dict(), tmp_path / "model.pt")
    code, out, err = run_cli(["sharpness", tmp_path / "model.pt", "--dataset", "cifar10", "--data-dir", cifar10_dir,
                              "--model", "cnn", "--samples", 64, "--iters", 5], capsys)
    assert code == 0, err
    assert "λ_max = " in out and float(out.split("λ_max = ")[1].split()[0]) > 0
    code, _, err = run_cli(["sharpness", tmp_path / "model.pt", "--dataset", "cifar10", "--data-dir", cifar10_dir,
                            "--model", "resnet18"], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot load" in err
    code, _, err = run_cli(["sharpness", tmp_path / "missing.pt"], capsys)
    assert code == 2 and "no model file" in err


def test_a_dominant_negative_eigenvalue_does_not_hide_the_top_one():
    a = _spd([2.0, 0.5, -9.0, -1.0])  # symmetric, indefinite: the largest magnitude is -9
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    value = top_eigenvalue([(lambda: 0.5 * w @ a @ w, 1.0)], [w], iters=2000, tol=1e-12).value
    assert value == pytest.approx(2.0, rel=1e-6)


def test_an_estimate_that_ran_out_of_products_says_so_and_lies_below_the_top():
    """A 40-dimensional spectrum with a dominant negative end: three products do not settle the top,
    and the estimate comes back unconverged and below λ_max = 1 (a Ritz value always is); with
    enough products it converges to 1 itself, never to the larger-magnitude −3."""
    spectrum = torch.cat([torch.tensor([1.0, -3.0]), torch.linspace(-0.9, 0.9, 38)]).double()
    a = _spd(spectrum.tolist())
    w = torch.randn(40, dtype=torch.float64, requires_grad=True)
    loss = [(lambda: 0.5 * w @ a @ w, 1.0)]
    capped = top_eigenvalue(loss, [w], iters=3, tol=1e-6)
    assert not capped.converged and capped.products == 3 and capped.value < 1.0
    settled = top_eigenvalue(loss, [w], iters=40, tol=1e-8)
    assert settled.converged and settled.products < 40 and settled.value == pytest.approx(1.0, rel=1e-6)
