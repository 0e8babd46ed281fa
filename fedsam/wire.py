"""The train message's contract: how a run's settings become its config (``train_config``) and
how a client reads them back (``optimizer_options``, ``strategy_value``), the records beside the
model, and cohort messages.

A key the ClientApp does not know is refused by name (``check_train_config``), never read as a
silent default; so is a run setting the message lacks.

Besides ``arrays`` (the global model ``w_t``) and ``config``, a train message may carry vectors
that shape the client's descent direction (``fedsam.train``), each an ArrayRecord keyed like the
model's parameters:

- ``momentum``: FedCM's and MoFedSAM's ``m_t``, the same for every client;
- ``correction``: the round's constant term ``b`` (SCAFFOLD's ``c − c_i``, FedDyn's ``λ·h_i``);
- ``global-perturbation``: FedSMOO's ``s``;
- ``dual``: FedSMOO's client dual ``u_i``, sent down and returned up;
- ``perturbation``: FedLESAM's fixed ``ε`` (its own ``ε_i``, or the last global change, shared);
- ``global-point``: FedGF's globally perturbed model ``w̃``, with ``gf-kappa`` in the config;
- ``optimizer-state``: what a client's optimizer keeps between its rounds (Sparse SAM's mask and
  epoch count), returned up and sent back the next time the client is sampled, by any strategy;
- ``arrays.PID``: the point a client starts from when it is not ``w_t`` (relaxed initialisation).

A record that differs per client is named ``NAME.PID`` (``correction.7``); one without the suffix
is shared by every client of the message (``client_record`` looks for both).

Several clients in one train message make fewer, fatter workers in a simulation.

Flower's Simulation Engine runs one ClientApp call per message. Sent one client per message, a
round of 100 clients is 100 calls, each paying the message's transport and, on a GPU, a model far
too small to fill the device. Grouped into one message per worker, a worker trains its whole
cohort in one call: one client after another, or as one batched model (``fedsam.cohort``).

The wire, both ways:

- the train message's config lists the cohort's partitions under ``PARTITION_IDS``; a message
  without it trains the receiving node's own partition, as on the Deployment Engine;
- the reply holds, per partition ``p``, its records named ``NAME.p`` (``arrays.p``,
  ``metrics.p``, ``dual.p``), or a ConfigRecord ``failed.p`` with the reason that client failed;
  a ConfigRecord ``cohort`` lists the partitions.

The server unpacks a cohort reply into one ordinary reply per client (``unpack``), so every
strategy aggregates, checks for non-finite arrays and records failures client by client.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict

from fedsam.optim import portable_spec

if TYPE_CHECKING:  # the settings live with the command line; the wire only reads them
    from simulations.config import ExperimentConfig

#: The run's settings every train message carries, each under its setting's key (``data_dir`` is
#: ``data-dir``). ``train_config`` writes them; the ClientApp reads them as they are.
RUN_KEYS = (
    "dataset", "data-dir", "partition", "num-clients", "dirichlet-alpha", "classes-per-client", "seed",
    "model", "norm", "optimizer", "fgsm-steps", "ascent-momentum", "local-epochs", "batch-size", "lr",
    "weight-decay", "momentum", "grad-clip", "device", "precision", "vectorize", "cuda-graphs", "asam-scope",
    "rounds",
)

#: Optimizer settings a run may leave unset, sent only when set (absent: the optimizer's own default).
OPTIONAL_KEYS = {"rho": float, "eta": float, "ssam-sparsity": float, "ssam-drop-rate": float,
                 "ssam-update-freq": int, "ssam-fisher-samples": int}

#: What a strategy adds to a round's config for its client rule (``fedsam.train``), and what a
#: client assumes when a strategy adds nothing: the plain step.
STRATEGY_DEFAULTS = {"momentum-alpha": 1.0, "anchor-pull": 0.0, "extra-weight-decay": 0.0,
                     "direction-decay": 0.0, "gf-kappa": 0.0}

PARTITION_IDS = "partition-ids"
SERVER_ROUND = "server-round"

#: Every key a train message's config may carry. Anything else is a misspelling.
TRAIN_CONFIG_KEYS = frozenset(RUN_KEYS) | frozenset(OPTIONAL_KEYS) | frozenset(STRATEGY_DEFAULTS) | {
    SERVER_ROUND, PARTITION_IDS}

# The records a train message may carry beside "arrays" and "config", and a reply beside "arrays"
# and "metrics" (see the module docstring).
MOMENTUM = "momentum"
CORRECTION = "correction"
GLOBAL_PERTURBATION = "global-perturbation"
DUAL = "dual"
PERTURBATION = "perturbation"
GLOBAL_POINT = "global-point"
OPTIMIZER_STATE = "optimizer-state"

COHORT = "cohort"
CLIENT_FAILED = 1  # Error code of a client that failed inside a cohort


def train_config(run: ExperimentConfig) -> ConfigRecord:
    """What every train message of a run carries (``RUN_KEYS``, and the ``OPTIONAL_KEYS`` that are
    set), from a resolved config (``ExperimentConfig.resolved()``: the method's optimizer and ρ
    written out); the strategy adds the round number, the round's lr and its own keys. The data folder goes
    as an absolute path and a plug-in optimizer as a spec any process can import."""
    values: dict[str, Any] = {key: getattr(run, key.replace("-", "_")) for key in RUN_KEYS}
    values["data-dir"] = str(Path(run.data_dir).expanduser().resolve())
    values["optimizer"] = portable_spec(run.optimizer)
    for key, kind in OPTIONAL_KEYS.items():
        value = getattr(run, key.replace("-", "_"))
        if value is not None:
            values[key] = kind(value)
    return ConfigRecord(values)


def check_train_config(config: ConfigRecord) -> None:
    """A misspelt key would silently fall back to a default on the client, and a missing one
    fail deep inside training: refuse either, by name."""
    unknown = sorted(set(config.keys()) - TRAIN_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in the train message's config "
                         f"(known: {', '.join(sorted(TRAIN_CONFIG_KEYS))})")
    missing = [key for key in (*RUN_KEYS, SERVER_ROUND) if key not in config]
    if missing:
        raise ValueError(f"the train message's config lacks {missing[0]!r} (a message built with "
                         "fedsam.wire.train_config carries every run setting)")


def strategy_value(config: ConfigRecord, key: str) -> float:
    """A strategy's key for the client rule, or the plain step's value when the round has none."""
    return float(config.get(key, STRATEGY_DEFAULTS[key]))


def optimizer_options(config: ConfigRecord, partition_id: int) -> dict:
    """The optimizer options a train message's config stands for: what ``fedsam.optim.build``
    passes on to a factory that names them (the server builds its check optimizer from them too)."""
    return {
        "partition_id": partition_id,
        "server_round": int(config[SERVER_ROUND]),
        "lr": float(config["lr"]),
        "momentum": float(config["momentum"]),
        "weight_decay": float(config["weight-decay"]) + strategy_value(config, "extra-weight-decay"),
        "rho": config.get("rho"),
        "eta": config.get("eta"),
        "steps": config["fgsm-steps"],
        "ascent_momentum": config["ascent-momentum"],
        "asam_scope": str(config["asam-scope"]),
        "sparsity": config.get("ssam-sparsity"),
        "update_freq": config.get("ssam-update-freq"),
        "num_samples": config.get("ssam-fisher-samples"),
        "drop_rate": config.get("ssam-drop-rate"),
        "total_epochs": config["rounds"],  # SSAM-D's drop rate follows the global round in a federation
    }


def split(partition_ids: list[int], workers: int, work: Sequence[float] | None = None) -> list[list[int]]:
    """``workers`` cohorts, each in id order. Without ``work``, of near-equal size, dealt round-robin
    from the sorted ids (a batched cohort takes as long as its longest client, whatever the others).
    With ``work`` (indexed by partition id: what a client costs, e.g. its examples), clients that
    train one after another are packed so the cohorts finish together: the largest first, each onto
    the cohort with the least work so far (longest-processing-time-first)."""
    ordered = sorted(partition_ids)
    count = min(workers, len(ordered))
    if work is None:
        return [ordered[i::workers] for i in range(count)]
    cohorts: list[list[int]] = [[] for _ in range(count)]
    loads = [0.0] * count
    for pid in sorted(ordered, key=lambda p: (-work[p], p)):
        lightest = min(range(count), key=lambda i: (loads[i], len(cohorts[i])))
        cohorts[lightest].append(pid)
        loads[lightest] += work[pid]
    return [sorted(c) for c in cohorts]


def client_record(content: RecordDict, name: str, partition_id: int) -> ArrayRecord | None:
    """The record ``name`` for this client: its own (``NAME.PID``), else the shared one, else ``None``."""
    own = content.get(f"{name}.{partition_id}")
    return own if own is not None else content.get(name)


def for_clients(content: RecordDict, partition_ids: Iterable[int]) -> RecordDict:
    """The content with only these clients' own records (a cohort message carries no one else's)."""
    wanted = {str(pid) for pid in partition_ids}
    return RecordDict({key: record for key, record in content.items()
                       if "." not in key or key.rpartition(".")[2] in wanted})


Result = dict[str, ArrayRecord | RecordDict]


def pack(results: dict[int, dict | str]) -> RecordDict:
    """A worker's reply: each client's records (``arrays``, ``metrics``, ...), or the reason it failed."""
    content = RecordDict({COHORT: ConfigRecord({PARTITION_IDS: sorted(results)})})
    for pid, result in results.items():
        if isinstance(result, str):
            content[f"failed.{pid}"] = ConfigRecord({"reason": result})
        else:
            for name, record in result.items():
                content[f"{name}.{pid}"] = record
    return content


def is_cohort_reply(reply: Message) -> bool:
    return not reply.has_error() and COHORT in reply.content


def failure(reply: Message, reason: str) -> Message:
    """An error reply standing for one client, shaped as if that client had failed."""
    return Message(error=Error(CLIENT_FAILED, reason), metadata=reply.metadata)


def unpack(reply: Message) -> dict[int, Message]:
    """One reply per client of a cohort reply, each shaped like a single client's reply."""
    records: dict[int, dict] = {}
    for key, record in reply.content.items():
        name, _, pid = key.rpartition(".")
        if name and pid.isdigit():
            records.setdefault(int(pid), {})[name] = record
    out = {}
    for pid in reply.content[COHORT][PARTITION_IDS]:
        pid = int(pid)
        own = records.get(pid, {})
        if "failed" in own:
            out[pid] = failure(reply, str(own["failed"]["reason"]))
        elif "arrays" not in own or "metrics" not in own:
            out[pid] = failure(reply, f"the cohort reply lacks client {pid}'s arrays or metrics")
        else:
            out[pid] = Message(RecordDict(own), metadata=reply.metadata)
    return out
