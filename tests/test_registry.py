"""The plug-in point: optimizers by registered name or import path, in this and other processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsam import optim
from fedsam.optim import FGSMSAM, SAM, OptimizerSpecError, build, portable_spec, register
from tests.plugins import custom_optim

ROOT = Path(__file__).resolve().parents[1]


def _train(opt, model, steps=40):
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("spec,kind", [("sgd", torch.optim.SGD), ("sam", SAM), ("asam", SAM), ("fgsm-sam", FGSMSAM)])
def test_builtin_names_build_and_train(spec, kind):
    model = nn.Linear(5, 2)
    opt = build(spec, model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, rho=None, steps=2)
    assert isinstance(opt, kind)
    losses = _train(opt, model)
    assert losses[-1] < losses[0]


def test_options_are_filtered_by_signature_and_none_means_default():
    sgd = build("sgd", nn.Linear(2, 2).parameters(), lr=0.1, rho=0.5, eta=0.2)
    assert sgd.param_groups[0]["lr"] == 0.1
    sam = build("sam", nn.Linear(2, 2).parameters(), lr=0.1, rho=None)
    assert sam.param_groups[0]["rho"] == 0.05
    asam = build("asam", nn.Linear(2, 2).named_parameters(), lr=0.1, rho=0.7, eta=0.2)
    assert asam.param_groups[0]["adaptive"] and asam.param_groups[0]["eta"] == 0.2
    adam = build("torch.optim:Adam", nn.Linear(2, 2).parameters(), lr=1e-3, momentum=0.9, weight_decay=0.0)
    assert isinstance(adam, torch.optim.Adam)


def test_custom_optimizer_by_import_path_trains_a_model():
    model = nn.Linear(5, 2)
    opt = build("tests.plugins.custom_optim:signsgd", model.parameters(), lr=0.01, momentum=0.9)
    assert isinstance(opt, custom_optim.SignSGD)
    losses = _train(opt, model, steps=60)
    assert losses[-1] < 0.7 * losses[0]


def test_register_a_name_and_make_it_portable():
    register("signsgd-test", custom_optim.signsgd)
    try:
        assert "signsgd-test" in optim.names()
        assert isinstance(build("signsgd-test", nn.Linear(2, 2).parameters()), custom_optim.SignSGD)
        assert portable_spec("signsgd-test") == "tests.plugins.custom_optim:signsgd"
        assert portable_spec("sam") == "sam"
        register("local-only", lambda params, lr=0.1: torch.optim.SGD(params, lr=lr))
        with pytest.raises(OptimizerSpecError, match="importable"):
            portable_spec("local-only")
    finally:
        optim.unregister("signsgd-test")
        optim.unregister("local-only")


@pytest.mark.long
def test_an_import_path_works_in_a_fresh_process():
    """What a Ray worker does: a new interpreter resolves the path and trains with it."""
    register("signsgd-proc", custom_optim.signsgd)
    try:
        spec = portable_spec("signsgd-proc")
    finally:
        optim.unregister("signsgd-proc")
    code = (
        "import torch, sys\n"
        "from fedsam.optim import build\n"
        "m = torch.nn.Linear(3, 2)\n"
        f"opt = build({spec!r}, m.parameters(), lr=0.1)\n"
        "x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))\n"
        "def closure():\n"
        "    opt.zero_grad(); l = torch.nn.functional.cross_entropy(m(x), y); l.backward(); return l\n"
        "opt.step(closure)\n"
        "print(type(opt).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SignSGD"


@pytest.mark.parametrize("name", ["sam", "", "a:b"])
def test_register_rejects_builtin_and_malformed_names(name):
    with pytest.raises(ValueError):
        register(name, custom_optim.signsgd)


def test_register_rejects_non_callables():
    with pytest.raises(ValueError, match="callable"):
        register("x-not-callable", 3)


@pytest.mark.parametrize("spec,fragments", [
    ("nope", ["'nope'", "unknown", "sgd"]),
    ("no_such_module_xyz:make", ["'no_such_module_xyz:make'", "cannot import", "No module named"]),
    ("tests.plugins.custom_optim:missing", ["'tests.plugins.custom_optim:missing'", "no attribute"]),
    ("tests.plugins.custom_optim:NOT_CALLABLE", ["NOT_CALLABLE", "not callable"]),
    ("tests.plugins.custom_optim:broken", ["'tests.plugins.custom_optim:broken'", "RuntimeError", "always fails"]),
])
def test_bad_specs_name_the_spec_and_the_cause(spec, fragments):
    with pytest.raises(OptimizerSpecError) as info:
        build(spec, nn.Linear(2, 2).parameters(), lr=0.1)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_a_bad_option_through_build_names_the_spec_and_the_argument():
    with pytest.raises(OptimizerSpecError, match=r"'asam'.*rho"):
        build("asam", nn.Linear(2, 2).named_parameters(), lr=0.1, rho=-1.0)
    with pytest.raises(OptimizerSpecError, match=r"'fgsm-sam'.*steps"):
        build("fgsm-sam", nn.Linear(2, 2).parameters(), lr=0.1, steps=0)
