"""Every federated method's CLIENT rule, as fedsam runs it, against `tests/reference_family.py`.

`run_client` assembles a client round from the ClientApp's own pieces, as
`fedsam/client_app.py::train_partitions` uses them (it does not call it): a train message (a
RecordDict with a ConfigRecord and the strategy's ArrayRecords) gives the optimizer options
(`wire.optimizer_options`, so weight-decay + extra-weight-decay is summed on the wire), the round's
constant `b` (`round_correction`: correction record − anchor-pull·w_{i,0}), the momentum, and
FedSMOO's duals (`DualSAM.load_duals`); then `train.train_locally` takes a few float64 steps on
fixed, distinct minibatches. The final weights (and FedSMOO's returned dual u_i) must match
`reference_family.client_round` (algorithms-family.md sections 0-8) to 1e-10 relative, with
gradient clipping active on some steps (C = 0.5) and with none (C = 0). The glue itself
(`train_partitions`: records in, the reply's model and dual out) is checked against the
reference by `test_client_app_path_matches_reference` (FedGAMMA and FedSMOO).

Spec test hooks and where they are checked:
- FedProx μ = 0 reproduces FedAvg bit for bit (section 1)       -> test_fedprox_mu_zero_is_fedavg
- C = ∞: the first step of FedProx and FedDyn is FedAvg's (1, 4)  -> test_first_step_of_prox_and_dyn_is_fedavg
- FedSMOO's first step is FedSpeed's when u = s = 0 (section 8)   -> test_fedsmoo_first_step_is_fedspeed
- DualSAM with ρ = 0 is SGD bit for bit; FedSMOO ρ = 0 is FedDyn (8) -> test_dual_sam_rho_zero_is_sgd
- FedCM with α = 1 equals FedAvg bit for bit (section 2)          -> test_fedcm_alpha_one_is_fedavg
- the same hooks on the reference itself, each also shown to break once the method's own term is
  on (ρ > 0, u_i or s ≠ 0, c ≠ c_i, α < 1), and FedDyn's first server step -> test_reference_*
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


# ------------------------------------------------------------ the reference's own spec hooks
# (formerly `reference_family._self_check`, which pytest never ran): each equivalence holds where
# the spec says it does, and each method differs from the one it reduces to once its own term is on.

def logistic_losses() -> tuple[list, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 8), generator=gen).double()
    losses = [lambda w, x=x[k], y=y[k]: F.binary_cross_entropy_with_logits(x @ w, y) for k in range(3)]
    return losses, torch.randn(5, generator=gen, dtype=torch.float64)


REF_KW = dict(lr=0.1, wd=1e-3, C=10.0, lam=LAM)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm()) > 1e-6 * float(b.norm())


@pytest.mark.parametrize("method", ["fedspeed", "fedsmoo"])
def test_reference_sam_methods_on_feddyn_are_feddyn_at_rho_zero_and_only_there(method):
    """7, 8: FedSpeed and FedSMOO with ρ = 0 are FedDyn bit for bit (ε = 0; for FedSMOO whatever
    ``u_i`` and ``s``); with ρ > 0 they are not."""
    losses, w0 = logistic_losses()
    gen = torch.Generator().manual_seed(2)
    duals = dict(u_i=0.1 * torch.randn(5, generator=gen, dtype=torch.float64),
                 s=0.1 * torch.randn(5, generator=gen, dtype=torch.float64)) if method == "fedsmoo" else {}
    h_i = torch.randn(5, generator=gen, dtype=torch.float64)
    dyn = ref.client_round("feddyn", losses, w0, h_i=h_i, **REF_KW)["w"]
    assert differs(dyn, ref.client_round("fedavg", losses, w0, **REF_KW)["w"])  # λ·(h_i − w0) bites
    assert torch.equal(ref.client_round(method, losses, w0, h_i=h_i, rho=0.0, **duals, **REF_KW)["w"], dyn)
    assert differs(ref.client_round(method, losses, w0, h_i=h_i, rho=0.1, **duals, **REF_KW)["w"], dyn)


def test_reference_fedsmoo_first_step_is_fedspeed_only_while_u_and_s_are_zero():
    """8: with ``u_i = s = 0`` FedSMOO's first step is FedSpeed's; from the second step on (u_i ≠ 0),
    or with ``s ≠ 0`` from the first, it is not."""
    losses, w0 = logistic_losses()
    speed = [ref.client_round("fedspeed", losses[:k], w0, rho=0.1, **REF_KW)["w"] for k in (1, 3)]
    smoo = [ref.client_round("fedsmoo", losses[:k], w0, rho=0.1, **REF_KW)["w"] for k in (1, 3)]
    assert torch.equal(smoo[0], speed[0]) and differs(smoo[1], speed[1])
    s = 0.1 * torch.ones(5, dtype=torch.float64) / 5 ** 0.5
    assert differs(ref.client_round("fedsmoo", losses[:1], w0, rho=0.1, s=s, **REF_KW)["w"], speed[0])


def test_reference_scaffold_is_fedavg_while_c_equals_c_i_only():
    """3: round 0 (``c = c_i = 0``) is FedAvg bit for bit, any ``c = c_i`` up to rounding; ``c ≠ c_i`` is not."""
    losses, w0 = logistic_losses()
    fedavg = ref.client_round("fedavg", losses, w0, **REF_KW)["w"]
    c = torch.linspace(-1, 1, 5, dtype=torch.float64)
    assert torch.equal(ref.client_round("scaffold", losses, w0, **REF_KW)["w"], fedavg)
    same = ref.client_round("scaffold", losses, w0, c=c, c_i=c.clone(), **REF_KW)["w"]
    torch.testing.assert_close(same, fedavg, rtol=1e-14, atol=1e-15)  # (g + c) − c_i: up to rounding
    assert differs(ref.client_round("scaffold", losses, w0, c=c, **REF_KW)["w"], fedavg)


def test_reference_fedcm_is_fedavg_at_alpha_one_only():
    """2: α = 1 ignores ``m`` (FedAvg bit for bit); α < 1 does not."""
    losses, w0 = logistic_losses()
    fedavg, m = ref.client_round("fedavg", losses, w0, **REF_KW)["w"], torch.ones(5, dtype=torch.float64)
    assert torch.equal(ref.client_round("fedcm", losses, w0, alpha=1.0, m=m, **REF_KW)["w"], fedavg)
    assert differs(ref.client_round("fedcm", losses, w0, alpha=0.5, m=m, **REF_KW)["w"], fedavg)


def test_reference_feddyn_first_server_step():
    """4: with all ``h_j = 0``, ``w_1 = w_0 + (1 + |S_0|/N) · mean_S(Δ_i)``."""
    _, w0 = logistic_losses()
    gen = torch.Generator().manual_seed(3)
    deltas = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2)]
    w1, table = ref.feddyn_server(w0, deltas, {}, [3, 7], N=10)
    torch.testing.assert_close(w1, w0 + (1 + 2 / 10) * ref.unweighted_mean(deltas), rtol=0, atol=1e-14)
    assert set(table) == {3, 7} and torch.equal(table[3], deltas[0])


# ------------------------------------------------------------ the ClientApp's own path
# `run_client` above assembles the ClientApp's pieces itself; this drives the real
# `fedsam.client_app.train_partitions` on the tests' synthetic CIFAR-10, one client, with two
# test seams: the cached model is its float64 copy and the minibatches are made in float64 (and
# recorded, so the reference takes the very same steps: crops, flips and order included).

APP_PID, APP_LR, APP_WD = 2, 0.05, 1e-3
APP_CLIP = {"fedgamma": 1.65, "fedsmoo": 2.0}  # between the steps' ‖d‖, so clipping bites on some steps only


def app_config(data_dir, strategy: str, clip: float, extra: dict) -> ConfigRecord:
    """The train message's config as a run of ``strategy`` sends it in round 1, plus ``extra`` (the
    keys its strategy adds to the round's config)."""
    from simulations.config import ExperimentConfig

    cfg = ExperimentConfig(data_dir=str(data_dir), partition="iid", num_clients=100, strategy=strategy,
                           local_epochs=1, batch_size=4, lr=APP_LR, weight_decay=APP_WD, grad_clip=clip,
                           device="cpu", rho=RHO, rounds=1).resolved()
    config = wire.train_config(cfg)
    config[wire.SERVER_ROUND] = 1
    config.update(extra)
    wire.check_train_config(config)
    return config


def scaled_to(vector: torch.Tensor, size: float) -> torch.Tensor:
    return size * vector / vector.norm()


@pytest.mark.parametrize("method", ["fedgamma", "fedsmoo"])
def test_client_app_path_matches_reference(method, cifar10_dir, monkeypatch):
    """FedGAMMA (SAM at ρ = 0.1, receiving ``c − c_i``) and FedSMOO (dual-sam at ρ = 0.1, receiving
    ``λ·h_i``, ``u_i`` and ``s``, returning ``u_i``) through ``train_partitions``: the returned model
    and FedSMOO's returned dual equal `reference_family.client_round` on the same minibatches, in
    float64, to 1e-10 relative, with clipping active on some steps."""
    from fedsam import client_app, worker
    from fedsam.data import DeviceBatches
    from fedsam.models import build_model

    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Float64Batches(DeviceBatches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "dtype": torch.float64})

        def __iter__(self):
            for x, y in super().__iter__():
                recorded.append((x.clone(), y.clone()))
                yield x, y

    torch.manual_seed(0)
    template = build_model("cnn", 10).double()
    monkeypatch.setattr(client_app, "cached_model",
                        lambda name, classes, norm, device: build_model(name, classes, norm).double())
    monkeypatch.setattr(worker, "DeviceBatches", Float64Batches)  # where a client's minibatches are made
    norms: list[float] = []
    clip_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        total = clip_norm(*args, **kwargs)
        norms.append(float(total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    names = [n for n, _ in template.named_parameters()]
    shapes = [p.shape for p in template.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in template.parameters()])
    gen = torch.Generator().manual_seed(5)
    rand = lambda size: scaled_to(torch.randn(w0.numel(), generator=gen, dtype=torch.float64), size)  # noqa: E731

    def split(w: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = w[i:i + math.prod(shape)].view(shape)
            i += math.prod(shape)
        return out

    def as_record(w: torch.Tensor) -> ArrayRecord:
        return ArrayRecord({k: v.clone() for k, v in split(w).items()})

    def loss(w, x, y):
        return F.cross_entropy(functional_call(template, split(w), (x,)), y)

    c, c_i, h_i, u_i, s = rand(1.0), rand(0.5), rand(3.0), rand(0.2), rand(RHO)
    extra, records, kw = {
        "fedgamma": ({}, {f"{wire.CORRECTION}.{APP_PID}": c - c_i}, dict(c=c, c_i=c_i)),
        "fedsmoo": ({"anchor-pull": LAM, "extra-weight-decay": LAM},
                    {f"{wire.CORRECTION}.{APP_PID}": LAM * h_i, f"{wire.DUAL}.{APP_PID}": u_i,
                     wire.GLOBAL_PERTURBATION: s}, dict(lam=LAM, h_i=h_i, u_i=u_i, s=s)),
    }[method]
    config = app_config(cifar10_dir, method, APP_CLIP[method], extra)
    assert config["optimizer"] == {"fedgamma": "sam", "fedsmoo": "dual-sam"}[method]
    content = RecordDict({"config": config, "arrays": as_record(w0), **{k: as_record(v) for k, v in records.items()}})
    reply = client_app.train_partitions(content, [APP_PID], str(cifar10_dir), isolate=False)[APP_PID]
    assert len(recorded) == len(norms) == reply["metrics"]["num-steps"] >= 3
    assert any(n > APP_CLIP[method] for n in norms) and any(n < APP_CLIP[method] for n in norms), norms
    got = reply["arrays"].to_torch_state_dict()
    assert all(got[n].dtype == torch.float64 for n in names)
    got_w = torch.cat([got[n].reshape(-1) for n in names])
    want = ref.client_round(method, [lambda w, x=x, y=y: loss(w, x, y) for x, y in recorded], w0,
                            lr=APP_LR, wd=APP_WD, C=APP_CLIP[method], rho=RHO, **kw)
    assert differs(got_w, w0)
    torch.testing.assert_close(got_w, want["w"], rtol=1e-10, atol=1e-12)
    if method == "fedsmoo":
        dual = reply[wire.DUAL].to_torch_state_dict()
        got_u = torch.cat([dual[n].reshape(-1) for n in names])
        assert differs(got_u, u_i)
        torch.testing.assert_close(got_u, want["u"], rtol=1e-10, atol=1e-12)
    else:
        assert wire.DUAL not in reply
