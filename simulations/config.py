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
from fedsam.optim import FEDERATED_RHO
from simulations.presets import PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = ("fedavg", "fedsam", "mofedsam", "fedavgm")
DEFAULT_OPTIMIZER = {"fedavg": "sgd", "fedavgm": "sgd", "fedsam": "sam", "mofedsam": "sam"}


#: Seeds go on the wire as Flower's signed 64-bit integers and into torch.manual_seed (and seed + 1).
SEED_LIMIT = 2 ** 63


class ConfigError(ValueError):
    """A config that cannot run: one line saying which setting and why."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, group: str = "run") -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


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
    server_lr: float = _f(1.0, "server learning rate η_g (1 = plain averaging)")
    server_momentum: float = _f(0.9, "FedAvgM's server momentum β")
    momentum_alpha: float = _f(0.1, "MoFedSAM's α: weight of the local SAM gradient against the global momentum")
    # client
    optimizer: str | None = _f(None, "client optimizer: sgd, sam, asam, fgsm-sam or package.module:factory "
                               "(default: sam for fedsam/mofedsam, sgd otherwise)")
    rho: float | None = _f(None, "perturbation radius (default: the optimizer's own)")
    eta: float | None = _f(None, "ASAM's η (default: the optimizer's own)")
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
                      "training its cohort in one call (0 = auto: one per Ray worker when clients train "
                      "batched, else one message per client)")
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
        (SAM for fedsam and mofedsam, SGD otherwise) and, for SAM under a SAM strategy, the
        federated papers' ρ = 0.1. The data-dir becomes absolute, so the config.json it is saved as
        works from any folder (``--resume``, ``fedsam sharpness``) and a sweep finds its runs again."""
        optimizer = self.optimizer or DEFAULT_OPTIMIZER.get(self.strategy, "sgd")  # validate() names a bad strategy
        rho = self.rho
        if rho is None and optimizer == "sam" and self.strategy in ("fedsam", "mofedsam"):
            rho = FEDERATED_RHO
        data_dir = str(Path(self.data_dir).expanduser().resolve()) if self.data_dir else self.data_dir
        return dataclasses.replace(self, optimizer=optimizer, rho=rho, data_dir=data_dir)

    def to_dict(self) -> dict[str, Any]:
        """Dashed keys, as in flags, TOML and config.json."""
        return {key(f): v for f, v in dataclasses.asdict(self).items()}


def key(name: str) -> str:
    return name.replace("_", "-")


def _field_types() -> dict[str, Any]:
    hints = {"str": str, "int": int, "float": float, "bool": bool, "str | None": str, "float | None": float}
    return {f.name: hints[f.type if isinstance(f.type, str) else f.type.__name__] for f in dataclasses.fields(ExperimentConfig)}


FIELD_TYPES = _field_types()


def coerce(name: str, value: Any, source: str) -> Any:
    """``value`` as the type the field wants, or ``ConfigError`` naming the source."""
    want = FIELD_TYPES[name]
    if value is None:
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
    """defaults < preset < config file < flags (a ``preset`` key in the file counts as a preset)."""
    file_values = read_toml(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", None)
    file_values.pop("preset", None)
    cfg = ExperimentConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        cfg = apply(cfg, PRESETS[preset], f"preset {preset}")
    cfg = apply(cfg, file_values, f"config file {config_file}")
    return apply(cfg, flags or {}, "command line")


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
    for name in ("lr", "server_lr", "dirichlet_alpha", "num_cpus_per_client", "client_timeout"):
        need(finite(name) > 0, f"{key(name)} must be > 0, got {getattr(cfg, name)}")
    need(0 < finite("lr_decay") <= 1, f"lr-decay must be in (0, 1], got {cfg.lr_decay}")
    need(finite("weight_decay") >= 0, f"weight-decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= finite("momentum") < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(0 <= finite("server_momentum") < 1, f"server-momentum must be in [0, 1), got {cfg.server_momentum}")
    need(0 < finite("momentum_alpha") <= 1, f"momentum-alpha must be in (0, 1], got {cfg.momentum_alpha}")
    need(finite("grad_clip") >= 0, f"grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    need(finite("ascent_momentum") >= 0, f"ascent-momentum must be >= 0, got {cfg.ascent_momentum}")
    need(cfg.rho is None or finite("rho") > 0, f"rho must be > 0, got {cfg.rho}")
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
    booleans as ``--x`` / ``--no-x``): the one place a run's command line is built."""
    argv = [sys.executable, "-m", "simulations", "run"]
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + str(name).replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv
