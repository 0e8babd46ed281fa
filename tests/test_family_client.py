"""Every federated method's CLIENT rule, as fedsam runs it, against `tests/reference_family.py`.

A client is run the way the ClientApp runs it (`fedsam/client_app.py::train_partitions`): a
train message (a RecordDict with a ConfigRecord and the strategy's ArrayRecords) gives the
optimizer options (`wire.optimizer_options`, so weight-decay + extra-weight-decay is summed on
the wire), the round's constant `b` (`round_correction`: correction record − anchor-pull·w_{i,0}),
the momentum, and FedSMOO's duals (`DualSAM.load_duals`); then `train.train_locally` takes a few
float64 steps on fixed, distinct minibatches. The final weights (and FedSMOO's returned dual u_i)
must match `reference_family.client_round` (algorithms-family.md sections 0-8) to 1e-10 relative,
with gradient clipping active on some steps (C = 0.5) and with none (C = 0).

Spec test hooks and where they are checked:
- FedProx μ = 0 reproduces FedAvg bit for bit (section 1)       -> test_fedprox_mu_zero_is_fedavg
- C = ∞: the first step of FedProx and FedDyn is FedAvg's (1, 4)  -> test_first_step_of_prox_and_dyn_is_fedavg
- FedSMOO's first step is FedSpeed's when u = s = 0 (section 8)   -> test_fedsmoo_first_step_is_fedspeed
- DualSAM with ρ = 0 is SGD bit for bit; FedSMOO ρ = 0 is FedDyn (8) -> test_dual_sam_rho_zero_is_sgd
- FedCM with α = 1 equals FedAvg bit for bit (section 2)          -> test_fedcm_alpha_one_is_fedavg
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.func import functional_call

from fedsam import wire
from fedsam.client_app import on_device, round_correction
from fedsam.optim import DualSAM, build
from fedsam.train import train_locally
from tests import reference_family as ref

PID, CPU = 3, torch.device("cpu")
LR, WD, RHO, MU, ALPHA, LAM = 0.1, 1e-3, 0.1, 0.1, 0.3, 0.1
CLIPS = [0.5, 0.0]  # clipping active on some steps / no clipping (C = ∞)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


TEMPLATE = make_model()
NAMES = [n for n, _ in TEMPLATE.named_parameters()]
SHAPES = [p.shape for p in TEMPLATE.parameters()]
SIZE = sum(math.prod(s) for s in SHAPES)


def unflat(w: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in zip(NAMES, SHAPES):
        n = math.prod(shape)
        out[name] = w[i:i + n].view(shape).clone()
        i += n
    return out


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


GEN = torch.Generator().manual_seed(1)
BATCHES = [(torch.randn(8, 4, generator=GEN, dtype=torch.float64), torch.randint(0, 3, (8,), generator=GEN))
           for _ in range(5)]
W0 = flat(TEMPLATE.parameters())
M, C_SERVER, C_OWN = (0.3 * torch.randn(SIZE, generator=GEN, dtype=torch.float64) for _ in range(3))
H_I, U_I = 0.5 * torch.randn(SIZE, generator=GEN, dtype=torch.float64), 0.05 * torch.randn(SIZE, generator=GEN,
                                                                                             dtype=torch.float64)
_s = torch.randn(SIZE, generator=GEN, dtype=torch.float64)
S = RHO * _s / _s.norm()  # the server's s = ρ·ū/‖ū‖


def flat_losses(batches):
    def loss(w, x, y):
        return F.cross_entropy(functional_call(TEMPLATE, unflat(w), (x,)), y)
    return [lambda w, x=x, y=y: loss(w, x, y) for x, y in batches]


def run_client(spec: str, config: dict, records: dict[str, torch.Tensor], *, clip: float,
               batches=BATCHES, norms: list | None = None) -> dict[str, torch.Tensor]:
    """One client round through the ClientApp's own pieces; ``norms`` collects ‖d‖ before each clip."""
    content = RecordDict({"config": ConfigRecord({"lr": LR, "weight-decay": WD, "server-round": 1, "momentum": 0.0,
                                                  "asam-scope": "reference", "fgsm-steps": 1, "ascent-momentum": 0.0,
                                                  "rounds": 1, "grad-clip": clip, **config}),
                          "arrays": ArrayRecord(unflat(W0)),
                          **{k: ArrayRecord(unflat(v)) for k, v in records.items()}})
    config = content["config"]
    assert set(config.keys()) <= wire.TRAIN_CONFIG_KEYS
    start = content["arrays"].to_torch_state_dict()
    model = make_model()
    model.load_state_dict(start)
    optimizer = build(spec, model.parameters(), **wire.optimizer_options(config, PID))
    if isinstance(optimizer, DualSAM):
        u = on_device(wire.client_record(content, wire.DUAL, PID), CPU)
        s = on_device(content.get(wire.GLOBAL_PERTURBATION), CPU)
        optimizer.load_duals(None if u is None else [u[n] for n in NAMES], None if s is None else [s[n] for n in NAMES])
    clip_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        total = clip_norm(*args, **kwargs)
        if norms is not None:
            norms.append(float(total))
        return total

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        train_locally(model, optimizer, batches, 1, grad_clip=float(config["grad-clip"]),
                      global_momentum=on_device(content.get(wire.MOMENTUM), CPU),
                      momentum_alpha=wire.strategy_value(config, "momentum-alpha"),
                      correction=round_correction(content, PID, start, NAMES, CPU),
                      direction_decay=wire.strategy_value(config, "direction-decay"))
    out = {"w": flat(model.parameters())}
    if isinstance(optimizer, DualSAM):
        out["u"] = flat(optimizer.duals())
    return out


# method -> (optimizer spec, config the strategy adds, records it sends, reference_family kwargs)
DYN_CONFIG = {"anchor-pull": LAM, "extra-weight-decay": LAM}
DYN_RECORDS = {f"{wire.CORRECTION}.{PID}": LAM * H_I}
METHODS = {
    "fedavg": ("sgd", {}, {}, {}),
    "fedsam": ("sam", {"rho": RHO}, {}, dict(rho=RHO)),
    "fedprox-reference": ("sgd", {"anchor-pull": MU, "extra-weight-decay": MU}, {}, dict(mu=MU)),
    "fedprox-paper": ("sgd", {"anchor-pull": MU, "direction-decay": MU}, {}, dict(mu=MU, prox_clip="paper")),
    "fedcm": ("sgd", {"momentum-alpha": ALPHA}, {wire.MOMENTUM: M}, dict(alpha=ALPHA, m=M)),
    "mofedsam": ("sam", {"momentum-alpha": ALPHA, "rho": RHO}, {wire.MOMENTUM: M}, dict(alpha=ALPHA, m=M, rho=RHO)),
    "scaffold": ("sgd", {}, {f"{wire.CORRECTION}.{PID}": C_SERVER - C_OWN}, dict(c=C_SERVER, c_i=C_OWN)),
    "fedgamma": ("sam", {"rho": RHO}, {f"{wire.CORRECTION}.{PID}": C_SERVER - C_OWN},
                 dict(c=C_SERVER, c_i=C_OWN, rho=RHO)),
    "feddyn": ("sgd", DYN_CONFIG, DYN_RECORDS, dict(lam=LAM, h_i=H_I)),
    "fedspeed": ("sam", {**DYN_CONFIG, "rho": RHO}, DYN_RECORDS, dict(lam=LAM, h_i=H_I, rho=RHO)),
    "fedsmoo": ("dual-sam", {**DYN_CONFIG, "rho": RHO},
                {**DYN_RECORDS, wire.GLOBAL_PERTURBATION: S, f"{wire.DUAL}.{PID}": U_I},
                dict(lam=LAM, h_i=H_I, rho=RHO, u_i=U_I, s=S)),
}


def reference(method: str, clip: float, batches=BATCHES, **kw) -> dict[str, torch.Tensor]:
    return ref.client_round(method.split("-")[0], flat_losses(batches), W0, lr=LR, wd=WD, C=clip, **kw)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("method", list(METHODS))
def test_client_matches_reference(method, clip):
    spec, config, records, kw = METHODS[method]
    norms: list[float] = []
    got = run_client(spec, config, records, clip=clip, norms=norms)
    want = reference(method, clip, **kw)
    if clip > 0:  # the test means something only if clipping bites on some step
        assert len(norms) == len(BATCHES) and any(n > clip for n in norms), norms
    else:
        assert norms == []
    assert not torch.equal(got["w"], W0)
    close(got["w"], want["w"])
    if method == "fedsmoo":
        close(got["u"], want["u"])
        assert not torch.equal(got["u"], U_I)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("form", ["extra-weight-decay", "direction-decay"])
def test_fedprox_mu_zero_is_fedavg(form, clip):
    prox = run_client("sgd", {"anchor-pull": 0.0, form: 0.0}, {}, clip=clip)
    assert torch.equal(prox["w"], run_client("sgd", {}, {}, clip=clip)["w"])


@pytest.mark.parametrize("method", ["fedprox-reference", "fedprox-paper", "feddyn"])
def test_first_step_of_prox_and_dyn_is_fedavg(method):
    """C = ∞ and h_i = 0 (round 0): the pull vanishes at w = w_{i,0}, up to float rounding."""
    spec, config, _, _ = METHODS[method]
    one = BATCHES[:1]
    got = run_client(spec, config, {}, clip=0.0, batches=one)["w"]
    fedavg = run_client("sgd", {}, {}, clip=0.0, batches=one)["w"]
    torch.testing.assert_close(got, fedavg, rtol=1e-14, atol=1e-15)
    assert not torch.equal(run_client(spec, config, {}, clip=0.0)["w"], run_client("sgd", {}, {}, clip=0.0)["w"])


@pytest.mark.parametrize("clip", CLIPS)
def test_fedsmoo_first_step_is_fedspeed(clip):
    one = BATCHES[:1]
    config = {**DYN_CONFIG, "rho": RHO}
    smoo = run_client("dual-sam", config, DYN_RECORDS, clip=clip, batches=one)
    speed = run_client("sam", config, DYN_RECORDS, clip=clip, batches=one)
    assert torch.equal(smoo["w"], speed["w"])
    both = [run_client(spec, config, DYN_RECORDS, clip=clip)["w"] for spec in ("dual-sam", "sam")]
    assert not torch.equal(*both)  # from step 2 on u_i ≠ 0 and the ascent differs


@pytest.mark.parametrize("clip", CLIPS)
def test_dual_sam_rho_zero_is_sgd(clip):
    duals = {wire.GLOBAL_PERTURBATION: S, f"{wire.DUAL}.{PID}": U_I}
    dual = run_client("dual-sam", {"rho": 0.0}, duals, clip=clip)
    assert torch.equal(dual["w"], run_client("sgd", {}, {}, clip=clip)["w"])
    close(dual["u"], U_I - len(BATCHES) * S)  # ε = 0, so u_i ← u_i − s every step
    smoo = run_client("dual-sam", {**DYN_CONFIG, "rho": 0.0}, {**DYN_RECORDS, **duals}, clip=clip)
    assert torch.equal(smoo["w"], run_client("sgd", DYN_CONFIG, DYN_RECORDS, clip=clip)["w"])


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("spec,config", [("sgd", {}), ("sam", {"rho": RHO})])
def test_fedcm_alpha_one_is_fedavg(spec, config, clip):
    """FedCM (sgd) and MoFedSAM (sam) with α = 1 ignore m: FedAvg and FedSAM bit for bit."""
    mixed = run_client(spec, {**config, "momentum-alpha": 1.0}, {wire.MOMENTUM: M}, clip=clip)
    assert torch.equal(mixed["w"], run_client(spec, config, {}, clip=clip)["w"])
