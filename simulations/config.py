"""One experiment config: its fields are the ``fedsam run`` flags, the TOML keys and the run-config keys.

A field ``dirichlet_alpha`` is the flag ``--dirichlet-alpha``, the key ``dirichlet-alpha`` in a
``--config`` TOML file, in ``config.json``, in ``flwr run --run-config`` and in
``fedsam sweep --vary``. Values are layered: defaults < ``--preset`` < ``--config`` file <
flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsam.data import DATASETS, SCHEMES, PartitionSpec
from fedsam.models import MODELS
from fedsam.optim import ASAM_SCOPE, ASAM_SCOPES, FEDERATED_RHO, FEDGF_RHO, check_rho
from simulations.presets import PRESETS
from strategies.fedadam import ADAM_BETA1, ADAM_BETA2, ADAM_TAU, FEDADAM_SERVER_LR
from strategies.feddyn import DYN_LAMBDA
from strategies.fedgf import GF_CALIBRATION, GF_WINDOW
from strategies.fedgloss import GLOSS_BETA, GLOSS_RHO, GLOSS_RHO0
from strategies.fedlesam import LESAM_CORRECTION, LESAM_RHO
from strategies.fedprox import PROX_MU
from strategies.scaffold import FEDGAMMA_RHO
from strategies.swa import SWA_COLLECT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The strategies, and the client optimizer each sends unless told otherwise.
DEFAULT_OPTIMIZER = {
    "fedavg": "sgd", "fedsam": "sam", "fedavgm": "sgd", "fedprox": "sgd", "fedadam": "sgd",
    "fedcm": "sgd", "mofedsam": "sam", "scaffold": "sgd", "fedgamma": "sam",
    "feddyn": "sgd", "fedspeed": "sam", "fedsmoo": "dual-sam",
    "fedlesam": "lesam", "fedlesam-s": "lesam", "fedlesam-d": "lesam", "fedgf": "gf-sam", "fedgloss": "sam",
}
STRATEGIES = tuple(DEFAULT_OPTIMIZER)

#: ρ under each SAM strategy when its SAM client is not given one (sam's own default is Foret et al.'s 0.05).
METHOD_RHO = {"fedsam": FEDERATED_RHO, "mofedsam": FEDERATED_RHO, "fedgamma": FEDGAMMA_RHO,
              "fedspeed": FEDERATED_RHO, "fedsmoo": FEDERATED_RHO,
              "fedlesam": LESAM_RHO, "fedlesam-s": LESAM_RHO, "fedlesam-d": LESAM_RHO, "fedgf": FEDGF_RHO,
              "fedgloss": GLOSS_RHO}

#: Methods whose client rule is their own optimizer, which no other method sends.
FIXED_CLIENT = {"fedsmoo": "dual-sam", "fedlesam": "lesam", "fedlesam-s": "lesam", "fedlesam-d": "lesam",
                "fedgf": "gf-sam"}

#: The server lr a method takes when ``--server-lr`` is 0 (its default): plain averaging's 1, but
#: FL-Simulator's 0.1 for FedAdam, whose Adam step diverges at 1.
METHOD_SERVER_LR = {"fedadam": FEDADAM_SERVER_LR}

#: A method whose client is the plain one, and its SAM variant: the pairs are named methods, so a
#: SAM optimizer under the plain name (or SGD under the SAM name) is refused rather than guessed.
SAM_VARIANT = {"fedcm": "mofedsam", "scaffold": "fedgamma", "feddyn": "fedspeed"}
SAM_FAMILY = ("sam", "asam", "fgsm-sam", "dual-sam", "ssam-f", "ssam-d", "gf-sam")

FEDDYN_FAMILY = ("feddyn", "fedspeed", "fedsmoo", "fedlesam-d")  # FedDyn's server: no server lr
LESAM_FAMILY = ("fedlesam", "fedlesam-s", "fedlesam-d")


#: Seeds go on the wire as Flower's signed 64-bit integers and into torch.manual_seed (and seed + 1).
SEED_LIMIT = 2 ** 63


class ConfigError(ValueError):
    """A config that cannot run: one line saying which setting and why."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, group: str = "run",
       methods: tuple[str, ...] | None = None) -> Any:
    """A setting: its default, help, allowed values, flag group, and the strategies that take it
    (``None``: all); giving it to another strategy is refused (``check_methods``)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "methods": methods})


@dataclass
class ExperimentConfig:
    # data and its split (shared with `fedsam partition`)
    dataset: str = _f("cifar10", "dataset", DATASETS, "data")
    data_dir: str = _f("data", "folder holding cifar-10-batches-py/ or cifar-100-python/", group="data")
    download: bool = _f(False, "download the dataset with torchvision if it is missing", group="data")
    num_clients: int = _f(10, "number of clients the training set is split across", group="partition")
    partition: str = _f("dirichlet", "how the training set is split", SCHEMES, "partition")
    dirichlet_alpha: float = _f(0.3, "α of dirichlet, dirichlet-equal and quantity", group="partition")
    classes_per_client: int = _f(2, "k of the pathological split", group="partition")
    seed: int = _f(0, "seed of the split, the initial model, client sampling and local training", group="partition")
    # model
    model: str = _f("cnn", "model", tuple(MODELS))
    norm: str = _f("group", "normalization layers of resnet18 (GroupNorm, 2 groups, or BatchNorm)", ("group", "batch"))
    # server
    strategy: str = _f("fedavg", "server strategy", STRATEGIES)
    rounds: int = _f(20, "federated rounds")
    clients_per_round: int = _f(5, "clients sampled each round (the expected number with bernoulli)")
    client_sampling: str = _f("uniform", "uniform: exactly clients-per-round; bernoulli: each client with "
                              "p = clients-per-round / num-clients (FL-Simulator)", ("uniform", "bernoulli"))
    server_lr: float = _f(0.0, "server learning rate η_g (0 = the method's: 1, plain averaging; fedadam 0.1)",
                          methods=tuple(m for m in DEFAULT_OPTIMIZER if m not in FEDDYN_FAMILY))
    server_momentum: float = _f(0.9, "FedAvgM's server momentum β", methods=("fedavgm",))
    momentum_alpha: float = _f(0.1, "FedCM's and MoFedSAM's α: weight of the local gradient against the global "
                               "momentum", methods=("fedcm", "mofedsam"))
    first_round_alpha: str = _f("one", "FedCM's and MoFedSAM's round 1, before any momentum: a plain step (one) or "
                                "α·g against m = 0 as FL-Simulator (alpha)", ("one", "alpha"),
                                methods=("fedcm", "mofedsam"))
    step_normaliser: str = _f("steps", "K in SCAFFOLD's c_i and FedCM's m: each client's own steps (steps) or "
                              "FL-Simulator's E·n_0/b for all (fl-simulator)", ("steps", "fl-simulator"),
                              methods=("fedcm", "mofedsam", "scaffold", "fedgamma", "fedlesam-s"))
    lesam_source: str = _f("client", "FedLESAM's perturbation: from the global model the client last received "
                           "(client, the paper) or the last global change (last-round, the reference's intent)",
                           ("client", "last-round"), methods=LESAM_FAMILY)
    lesam_correction: float = _f(LESAM_CORRECTION, "FedLESAM-S's weight λ_c of c - c_i in the step (1 = SCAFFOLD's; the "
                                 "reference: 0.1)", methods=("fedlesam-s",))
    relaxed_init: float = _f(0.0, "relaxed initialisation β_RI: a client starts from w + β(w - its last model) "
                             "(FL-Simulator's --use-RI; 0 = off)",
                             methods=tuple(m for m in DEFAULT_OPTIMIZER if m not in ("fedavgm", "fedgf", "fedgloss")))
    swa_start: int = _f(0, "server-side SWA from this round on (1-based): the server averages global models and "
                        "evaluates the average (0 = off; Caldarola et al.: 75%% of the rounds, +1)")
    swa_cycle: int = _f(1, "SWA's cycle c: collect a model every c rounds; c > 1 also cycles the clients' lr "
                        "towards --swa-lr")
    swa_lr: float = _f(1e-4, "SWA's lowest client lr η_2 (used when --swa-cycle > 1)")
    swa_collect: str = _f(SWA_COLLECT[0], "which models SWA averages: those after rounds start+c, start+2c, ... as the "
                          "reference code (reference), or those of each cycle's last, lowest-lr round, as Izmailov "
                          "et al.'s SWA (end-of-cycle)", SWA_COLLECT)
    gf_threshold: float = _f(0.0, "FedGF's divergence threshold τ_D (0 = measured: the median divergence of the "
                             "first --gf-calibration rounds, with κ = 0 meanwhile)", methods=("fedgf",))
    gf_calibration: int = _f(GF_CALIBRATION, "rounds FedGF measures to set τ_D when --gf-threshold is 0", methods=("fedgf",))
    gf_window: int = _f(GF_WINDOW, "FedGF's window W: κ is the fraction of the last W rounds above τ_D", methods=("fedgf",))
    gf_server_rho: float = _f(0.0, "FedGF's ρ_g, the global point's distance (0 = the clients' ρ)",
                              methods=("fedgf",))
    gloss_momentum: float = _f(0.0, "FedGloSS's server SGD momentum μ_s", methods=("fedgloss",))
    gloss_beta: float = _f(GLOSS_BETA, "FedGloSS's ADMM β (> 0; inf turns the duals off)", methods=("fedgloss",))
    gloss_server_rho: float = _f(GLOSS_RHO, "FedGloSS's server radius ρ (0: no server perturbation); --rho is the "
                                 "clients' ρ_l", methods=("fedgloss",))
    gloss_warmup: int = _f(0, "FedGloSS's ρ warm-up T_s: both radii ramp from --gloss-rho0 over this many rounds "
                           "(0 = none; the paper's 2000 comes with --preset fedgloss-cifar10)", methods=("fedgloss",))
    gloss_rho0: float = _f(GLOSS_RHO0, "where FedGloSS's ρ warm-up starts", methods=("fedgloss",))
    gloss_dual: str = _f("reference", "FedGloSS's server dual step: Σ Δ_i/(β N |S|) as the reference code "
                         "(reference) or Σ Δ_i/(β N) as the paper (paper)", ("reference", "paper"),
                         methods=("fedgloss",))
    prox_mu: float = _f(PROX_MU, "FedProx's proximal weight μ", methods=("fedprox",))
    prox_clip: str = _f("reference", "where FedProx's pull is clipped: FL-Simulator's -μ·w_0 in the clipped "
                        "direction and +μ·w as weight decay (reference), or μ(w - w_0) clipped whole (paper)",
                        ("reference", "paper"), methods=("fedprox",))
    dyn_lambda: float = _f(DYN_LAMBDA, "FedDyn's, FedSpeed's and FedSMOO's regulariser weight λ",
                           methods=FEDDYN_FAMILY)
    adam_beta1: float = _f(ADAM_BETA1, "FedAdam's first-moment decay β1", methods=("fedadam",))
    adam_beta2: float = _f(ADAM_BETA2, "FedAdam's second-moment decay β2", methods=("fedadam",))
    adam_tau: float = _f(ADAM_TAU, "FedAdam's adaptivity τ", methods=("fedadam",))
    adam_v0: str = _f("zero", "FedAdam's initial v: 0 as FL-Simulator (zero) or τ² as the paper (tau2)",
                      ("zero", "tau2"), methods=("fedadam",))
    # client
    optimizer: str | None = _f(None, "client optimizer: sgd, sam, asam, fgsm-sam, dual-sam or "
                               "package.module:factory (default: the strategy's: sam for the SAM methods, "
                               "dual-sam for fedsmoo, sgd otherwise)")
    rho: float | None = _f(None, "perturbation radius, >= 0 (default: the optimizer's own; 0 perturbs by nothing: "
                                 "the method's base rule, with the SAM passes)")
    eta: float | None = _f(None, "ASAM's η (default: the optimizer's own)")
    asam_scope: str = _f(ASAM_SCOPE, "the tensors ASAM scales: every weight, normalization weights included, as "
                         "the reference code (reference), or weight matrices only (matrices)", ASAM_SCOPES)
    ssam_sparsity: float | None = _f(None, "Sparse SAM's sparsity s, the fraction of entries not perturbed "
                                     "(default: the optimizer's 0.2)")
    ssam_update_freq: int | None = _f(None, "Sparse SAM refreshes its mask every this many of a client's epochs "
                                      "(default: 5)")
    ssam_fisher_samples: int | None = _f(None, "SSAM-F's examples per Fisher refresh n_F (default: 1024)")
    ssam_drop_rate: float | None = _f(None, "SSAM-D's initial drop rate r_0 (default: 0.5)")
    fgsm_steps: int = _f(1, "ascent steps k of fgsm-sam")
    ascent_momentum: float = _f(0.0, "MI-FGSM momentum μ of fgsm-sam")
    local_epochs: int = _f(1, "local epochs per round")
    batch_size: int = _f(50, "local minibatch size")
    lr: float = _f(0.05, "local learning rate η_l in round 1")
    lr_decay: float = _f(1.0, "η_l is multiplied by this after every round (FL-Simulator: 0.998)")
    weight_decay: float = _f(0.0, "local weight decay")
    momentum: float = _f(0.0, "local SGD momentum")
    grad_clip: float = _f(0.0, "clip each local gradient to this L2 norm (0 = off)")
    # execution and results
    device: str = _f("auto", "where clients train and the server evaluates", ("auto", "cpu", "cuda"))
    precision: str = _f("auto", "forward passes in bf16 autocast (auto: on GPUs) or fp32; weights, gradients "
                        "and SAM's perturbation stay fp32", ("auto", "fp32", "bf16"))
    vectorize: str = _f("auto", "train a worker's cohort of clients as one batched model (auto: on GPUs, where it "
                        "was measured faster; built-in optimizers only)", ("auto", "on", "off"))
    cuda_graphs: str = _f("auto", "replay each local training step as one CUDA graph (auto: on GPUs)",
                          ("auto", "on", "off"))
    workers: int = _f(0, "cohort messages per round: the round's clients are dealt to this many workers, each "
                      "training its cohort in one call (0 = auto: one per Ray worker when clients train batched "
                      "or on a local CPU with two workers or more, else one message per client)")
    num_cpus_per_client: float = _f(1.0, "CPU cores Ray reserves per client")
    num_gpus_per_client: float = _f(-1.0, "GPU share Ray reserves per client, e.g. 0.25 (-1 = auto)")
    ray_num_cpus: int = _f(0, "CPU cores the local Ray instance may use (0 = all; a sweep sets it per run)")
    ray_address: str = _f("", "attach to a running Ray cluster (auto, HOST:PORT or ray://HOST:PORT) "
                          "instead of starting one")
    eval_every: int = _f(1, "evaluate the global model on the test set every this many rounds")
    checkpoint_every: int = _f(10, "write checkpoint.pt every this many rounds (and after the last, and on Ctrl-C)")
    min_successful_clients: int = _f(1, "stop the run when fewer clients than this succeed in a round")
    client_timeout: float = _f(3600.0, "seconds to wait for a round's replies; later ones count as failed clients")
    sharpness_every: int = _f(0, "record the global model's top Hessian eigenvalue every this many rounds (0 = off)")
    sharpness_samples: int = _f(1024, "size of the fixed, seeded training subset sharpness is measured on")
    out: str = _f("", "folder for this run's results")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def partition_spec(self) -> PartitionSpec:
        return PartitionSpec(self.partition, self.num_clients, self.seed, self.dirichlet_alpha, self.classes_per_client)

    def resolved(self) -> "ExperimentConfig":
        """The same config with the strategy-dependent defaults written out: the client optimizer
        (``DEFAULT_OPTIMIZER``), for SAM under a SAM strategy its ρ (``METHOD_RHO``), and the
        server lr (``METHOD_SERVER_LR``). The data-dir becomes absolute, so the config.json it is saved as
        works from any folder (``--resume``, ``fedsam sharpness``) and a sweep finds its runs again."""
        optimizer = self.optimizer or DEFAULT_OPTIMIZER.get(self.strategy, "sgd")  # validate() names a bad strategy
        rho = self.rho
        if rho is None and optimizer in ("sam", "dual-sam", "lesam", "gf-sam") and self.strategy in METHOD_RHO:
            rho = METHOD_RHO[self.strategy]
        data_dir = str(Path(self.data_dir).expanduser().resolve()) if self.data_dir else self.data_dir
        server_lr = self.server_lr or METHOD_SERVER_LR.get(self.strategy, 1.0)
        return dataclasses.replace(self, optimizer=optimizer, rho=rho, data_dir=data_dir, server_lr=server_lr)

    def to_dict(self) -> dict[str, Any]:
        """Dashed keys, as in flags, TOML and config.json."""
        return {key(f): v for f, v in dataclasses.asdict(self).items()}


def key(name: str) -> str:
    return name.replace("_", "-")


#: The settings that say which method a run is, besides each method's own (``methods=``): what a
#: report compares across, against FedAvg with SGD.
METHOD_FIELDS = ("strategy", "optimizer", "rho", "eta", "asam_scope", "fgsm_steps", "ascent_momentum",
                 "ssam_sparsity", "ssam_update_freq", "ssam_fisher_samples", "ssam_drop_rate", "server_lr",
                 "swa_start", "swa_cycle", "swa_lr", "swa_collect")


#: The settings ``fedsam run --resume`` may change: how long a run goes and how it is carried out, never
#: what a round computes. A sweep's runs and a report's configurations do not differ by the rest of them.
RESUMABLE = ("rounds", "checkpoint_every", "client_timeout", "min_successful_clients", "num_cpus_per_client",
             "num_gpus_per_client", "ray_num_cpus", "ray_address")


def comparable(values: dict[str, Any]) -> dict[str, Any]:
    """The settings (dashed keys) that decide what a run computes; the rest may change when it is resumed."""
    return {k: v for k, v in values.items() if k != "out" and k.replace("-", "_") not in RESUMABLE}


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first key (in sorted order) whose value differs between two settings dicts, or ``None``."""
    return next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)


def rounds_fixed(values: dict[str, Any]) -> str | None:
    """Why a started run's ``--rounds`` cannot change (its schedule spans the run), or ``None``."""
    if values.get("optimizer") == "ssam-d":
        return "SSAM-D's drop rate follows a cosine over the run's rounds, so more rounds would redraw rounds already run"
    return None


#: The method settings FedAvg's own server reads too: a run of another method is compared with the
#: FedAvg + SGD run that shares them (``fedsam report``).
SERVER_FIELDS = ("server_lr", "relaxed_init", "swa_start", "swa_cycle", "swa_lr", "swa_collect")


def method_keys() -> set[str]:
    """The dashed keys of every setting that describes the method (``METHOD_FIELDS`` and those
    declared ``methods=``)."""
    own = {f.name for f in dataclasses.fields(ExperimentConfig) if f.metadata.get("methods") is not None}
    return {key(name) for name in (*METHOD_FIELDS, *own)}


def _field_types() -> dict[str, Any]:
    hints = {"str": str, "int": int, "float": float, "bool": bool, "str | None": str, "float | None": float,
             "int | None": int}
    return {f.name: hints[f.type if isinstance(f.type, str) else f.type.__name__] for f in dataclasses.fields(ExperimentConfig)}


FIELD_TYPES = _field_types()

#: Settings whose default is "unset" (the strategy's optimizer, the optimizer's own ρ, ...). TOML
#: has no null, so ``""`` says unset in a TOML file and in ``flwr run``'s run config.
UNSET_BY_DEFAULT = frozenset(f.name for f in dataclasses.fields(ExperimentConfig) if f.default is None)


def coerce(name: str, value: Any, source: str) -> Any:
    """``value`` as the type the field wants, or ``ConfigError`` naming the source."""
    want = FIELD_TYPES[name]
    if value is None or (value == "" and name in UNSET_BY_DEFAULT):
        return None
    try:
        if want is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if want is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if want is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key(name)} must be {want.__name__}, got {value!r}") from None


def apply(cfg: ExperimentConfig, values: dict[str, Any], source: str) -> ExperimentConfig:
    """A copy of ``cfg`` with ``values`` (dashed or underscored keys) set; unknown keys are errors."""
    known = set(ExperimentConfig.field_names())
    updates = {}
    for raw_key, value in values.items():
        name = str(raw_key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{source}: unknown setting {raw_key!r}")
        updates[name] = coerce(name, value, source)
    return dataclasses.replace(cfg, **updates)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not readable TOML: {exc}") from None
    if any(isinstance(v, dict) for v in values.values()):
        raise ConfigError(f"config file {path}: settings must be top-level keys, not tables")
    return values


def resolve(flags: dict[str, Any] | None = None, preset: str | None = None,
            config_file: str | None = None) -> ExperimentConfig:
    """defaults < preset < config file < flags (a ``preset`` key in the file counts as a preset). A preset's settings for the run's strategy (``PRESETS[name]
    ["methods"]``) come with it; a flag or file setting the strategy does not take is refused."""
    file_values = read_toml(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", None)
    file_values.pop("preset", None)
    flags = flags or {}
    preset_values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        preset_values = {k: v for k, v in PRESETS[preset].items() if k != "methods"}
    layered = apply(apply(apply(ExperimentConfig(), preset_values, "preset"), file_values, "file"), flags, "flags")
    strategy = layered.strategy
    if preset is not None:
        preset_values.update(PRESETS[preset].get("methods", {}).get(strategy, {}))
    check_methods(strategy, file_values, f"config file {config_file}")
    check_methods(strategy, flags, "command line")
    cfg = apply(ExperimentConfig(), preset_values, f"preset {preset}")
    cfg = apply(cfg, file_values, f"config file {config_file}")
    return apply(cfg, flags, "command line")


def check_methods(strategy: str, values: dict[str, Any], source: str) -> None:
    """Refuse a method's setting given to a strategy that does not take it (``--strategy scaffold
    --momentum-alpha 0.5`` is almost surely not what was meant), and a client optimizer that makes
    a method another named one (SCAFFOLD with SAM is FedGAMMA)."""
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    for raw_key in values:
        f = fields.get(str(raw_key).replace("-", "_"))
        takers = f.metadata.get("methods") if f is not None else None
        if takers is not None and strategy in DEFAULT_OPTIMIZER and strategy not in takers:
            raise ConfigError(f"{source}: --strategy {strategy} does not take {key(f.name)} "
                              f"(it is {', '.join(takers)}'s)")
    optimizer = values.get("optimizer") or None  # "" is unset, as in coerce
    if optimizer is None:
        return
    sam = optimizer in SAM_FAMILY
    plain_of = {v: k for k, v in SAM_VARIANT.items()}
    if sam and strategy in SAM_VARIANT:
        raise ConfigError(f"{source}: {strategy} with a SAM client ({optimizer}) is "
                          f"{SAM_VARIANT[strategy]}: use --strategy {SAM_VARIANT[strategy]}")
    if optimizer == "sgd" and strategy in plain_of:
        raise ConfigError(f"{source}: {strategy} with an SGD client is {plain_of[strategy]}: "
                          f"use --strategy {plain_of[strategy]}")
    for method, client in FIXED_CLIENT.items():
        if strategy == method and optimizer != client:
            raise ConfigError(f"{source}: {method}'s clients use only {client} (got --optimizer {optimizer})")
        if optimizer == client and FIXED_CLIENT.get(strategy) != client:
            raise ConfigError(f"{source}: {client} is the client optimizer of "
                              f"{', '.join(m for m, c in FIXED_CLIENT.items() if c == client)}, not of {strategy}")


def validate(cfg: ExperimentConfig) -> None:
    """Every check that needs neither the data nor Ray; ``ConfigError`` on the first failure."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"unknown {key(f.name)} {value!r} (choose from {', '.join(choices)})")

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def finite(name: str) -> float:
        value = getattr(cfg, name)
        need(value is None or math.isfinite(value), f"{key(name)} must be a finite number, got {value}")
        return value

    for name in ("num_clients", "rounds", "local_epochs", "batch_size", "eval_every", "clients_per_round",
                 "fgsm_steps", "classes_per_client", "sharpness_samples", "checkpoint_every",
                 "min_successful_clients"):
        need(getattr(cfg, name) >= 1, f"{key(name)} must be >= 1, got {getattr(cfg, name)}")
    need(cfg.clients_per_round <= cfg.num_clients,
         f"clients-per-round ({cfg.clients_per_round}) is above num-clients ({cfg.num_clients})")
    need(cfg.min_successful_clients <= cfg.clients_per_round,
         f"min-successful-clients ({cfg.min_successful_clients}) is above clients-per-round ({cfg.clients_per_round})")
    need(finite("server_lr") >= 0, f"server-lr must be > 0 (or 0 for the method's own), got {cfg.server_lr}")
    for name in ("lr", "dirichlet_alpha", "num_cpus_per_client", "client_timeout"):
        need(finite(name) > 0, f"{key(name)} must be > 0, got {getattr(cfg, name)}")
    need(0 < finite("lr_decay") <= 1, f"lr-decay must be in (0, 1], got {cfg.lr_decay}")
    need(finite("weight_decay") >= 0, f"weight-decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= finite("momentum") < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(0 <= finite("server_momentum") < 1, f"server-momentum must be in [0, 1), got {cfg.server_momentum}")
    need(0 < finite("momentum_alpha") <= 1, f"momentum-alpha must be in (0, 1], got {cfg.momentum_alpha}")
    need(finite("prox_mu") >= 0, f"prox-mu must be >= 0, got {cfg.prox_mu}")
    need(cfg.ssam_sparsity is None or 0 <= finite("ssam_sparsity") <= 1,
         f"ssam-sparsity must be in [0, 1] (the fraction of entries not perturbed), got {cfg.ssam_sparsity}")
    need(cfg.ssam_drop_rate is None or 0 <= finite("ssam_drop_rate") <= 1,
         f"ssam-drop-rate must be in [0, 1], got {cfg.ssam_drop_rate}")
    for name in ("ssam_update_freq", "ssam_fisher_samples"):
        need(getattr(cfg, name) is None or getattr(cfg, name) >= 1, f"{key(name)} must be >= 1, got {getattr(cfg, name)}")
    need(cfg.gf_threshold >= 0, f"gf-threshold must be >= 0 (0 = measured, inf = never), got {cfg.gf_threshold}")
    need(finite("gf_server_rho") >= 0, f"gf-server-rho must be >= 0 (0 = the clients' rho), got {cfg.gf_server_rho}")
    for name in ("gf_calibration", "gf_window"):
        need(getattr(cfg, name) >= 1, f"{key(name)} must be >= 1, got {getattr(cfg, name)}")
    need(0 <= finite("gloss_momentum") < 1, f"gloss-momentum must be in [0, 1), got {cfg.gloss_momentum}")
    need(cfg.gloss_beta > 0, f"gloss-beta must be > 0 (inf turns the duals off), got {cfg.gloss_beta}")
    need(finite("gloss_server_rho") >= 0, f"gloss-server-rho must be >= 0, got {cfg.gloss_server_rho}")
    need(finite("gloss_rho0") >= 0, f"gloss-rho0 must be >= 0, got {cfg.gloss_rho0}")
    need(cfg.gloss_warmup >= 0, f"gloss-warmup must be >= 0 (0 = none), got {cfg.gloss_warmup}")
    need(finite("lesam_correction") >= 0, f"lesam-correction must be >= 0, got {cfg.lesam_correction}")
    need(finite("relaxed_init") >= 0, f"relaxed-init must be >= 0 (0 = off), got {cfg.relaxed_init}")
    need(cfg.swa_start >= 0, f"swa-start must be a round >= 1 (0 = off), got {cfg.swa_start}")
    need(cfg.swa_start <= cfg.rounds, f"swa-start {cfg.swa_start} is after the last round ({cfg.rounds}): SWA would "
                                      "never begin (0 turns it off)")
    need(cfg.swa_cycle >= 1, f"swa-cycle must be >= 1, got {cfg.swa_cycle}")
    need(finite("swa_lr") > 0, f"swa-lr must be > 0, got {cfg.swa_lr}")
    need(finite("dyn_lambda") >= 0, f"dyn-lambda must be >= 0, got {cfg.dyn_lambda}")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= finite(name) < 1, f"{key(name)} must be in [0, 1), got {getattr(cfg, name)}")
    need(finite("adam_tau") > 0, f"adam-tau must be > 0, got {cfg.adam_tau}")
    need(finite("grad_clip") >= 0, f"grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    need(finite("ascent_momentum") >= 0, f"ascent-momentum must be >= 0, got {cfg.ascent_momentum}")
    if finite("rho") is not None:
        try:
            check_rho(cfg.rho)  # the optimizers' own rule, checked before anything starts
        except ValueError as exc:
            raise ConfigError(f"{exc} (0: the base method, with the SAM passes)") from None
    if cfg.optimizer is not None:
        check_methods(cfg.strategy, {"optimizer": cfg.optimizer}, "optimizer")
    need(cfg.eta is None or finite("eta") >= 0, f"eta must be >= 0, got {cfg.eta}")
    need(finite("num_gpus_per_client") == -1 or cfg.num_gpus_per_client >= 0,
         f"num-gpus-per-client must be >= 0 (or -1 for auto), got {cfg.num_gpus_per_client}")
    need(cfg.ray_num_cpus >= 0, f"ray-num-cpus must be >= 0 (0 = all), got {cfg.ray_num_cpus}")
    need(cfg.workers >= 0, f"workers must be >= 0 (0 = auto), got {cfg.workers}")
    need(cfg.sharpness_every >= 0, f"sharpness-every must be >= 0 (0 = off), got {cfg.sharpness_every}")
    need(bool(cfg.data_dir), "data-dir must not be empty")
    need(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    need(cfg.seed < SEED_LIMIT, f"seed must be below 2**63 = {SEED_LIMIT} (Flower's messages carry it as a "
                                f"64-bit integer, torch.manual_seed takes 64 bits), got {cfg.seed}")
    if cfg.out:
        blocker = file_in_the_way(Path(cfg.out).expanduser())
        need(blocker is None, f"--out {cfg.out}: {blocker} is a file, not a folder")


def file_in_the_way(path: Path) -> Path | None:
    """``path`` or the first of its parents that exists, if that is not a folder (mkdir would fail)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


#: The placeholder a flag's help shows for its value: what it is, not the field's last word.
METAVARS = {int: "N", float: "X", str: "NAME"}
STR_METAVARS = {"data_dir": "DIR", "out": "DIR", "ray_address": "ADDRESS", "optimizer": "SPEC"}


def add_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None,
              exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per config field (but those in ``exclude``); unset flags stay out of the
    namespace so lower layers show through."""
    for f in dataclasses.fields(ExperimentConfig):
        if (groups is not None and f.metadata["group"] not in groups) or f.name in exclude:
            continue
        kind = FIELD_TYPES[f.name]
        default = f.default
        help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, "") else "")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(f"--{key(f.name)}", action=argparse.BooleanOptionalAction, **common)
        else:
            metavar = None if f.metadata.get("choices") else STR_METAVARS.get(f.name, METAVARS[kind])
            parser.add_argument(f"--{key(f.name)}", type=kind, choices=f.metadata.get("choices"), metavar=metavar,
                                **common)


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    names = set(ExperimentConfig.field_names())
    return {k: v for k, v in vars(args).items() if k in names}


def write_json(cfg: ExperimentConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    path.write_text(json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2) + "\n")


def run_command(values: dict[str, Any]) -> list[str]:
    """The ``fedsam run`` argv for these settings (field names or flag names; ``None`` left out,
    booleans as ``--x`` / ``--no-x``, and a method's settings left out when ``values`` names
    another strategy, which would refuse them): the one place a run's command line is built."""
    argv = [sys.executable, "-m", "simulations", "run"]
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    strategy = values.get("strategy")
    for name, value in values.items():
        f = fields.get(str(name).replace("-", "_"))
        takers = f.metadata.get("methods") if f is not None else None
        if value is None or (strategy is not None and takers is not None and strategy not in takers):
            continue
        flag = "--" + str(name).replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv
