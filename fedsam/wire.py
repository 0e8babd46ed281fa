"""The train message's contract: the config keys it may carry, and cohort messages.

A key the ClientApp does not know is refused by name (``check_train_config``), never read as a
silent default.

Several clients in one train message make fewer, fatter workers in a simulation.

Flower's Simulation Engine runs one ClientApp call per message. Sent one client per message, a
round of 100 clients is 100 calls, each paying the message's transport and, on a GPU, a model far
too small to fill the device. Grouped into one message per worker, a worker trains its whole
cohort in one call: one client after another, or as one batched model (``fedsam.cohort``).

The wire, both ways:

- the train message's config lists the cohort's partitions under ``PARTITION_IDS``; a message
  without it trains the receiving node's own partition, as on the Deployment Engine;
- the reply holds, per partition ``p``, an ArrayRecord ``arrays.p`` and a MetricRecord
  ``metrics.p``, or a ConfigRecord ``failed.p`` with the reason that client failed; a
  ConfigRecord ``cohort`` lists the partitions.

The server unpacks a cohort reply into one ordinary reply per client (``unpack``), so every
strategy aggregates, checks for non-finite arrays and records failures client by client.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

#: Every key a train message's config may carry: the run's settings the ClientApp reads, what the
#: strategy adds each round, and the cohort's partitions. Anything else is a misspelling.
TRAIN_CONFIG_KEYS = frozenset({
    "dataset", "data-dir", "partition", "num-clients", "dirichlet-alpha", "classes-per-client", "seed",
    "model", "norm", "optimizer", "rho", "eta", "fgsm-steps", "ascent-momentum", "local-epochs",
    "batch-size", "lr", "weight-decay", "momentum", "grad-clip", "device", "precision", "vectorize",
    "cuda-graphs", "server-round", "momentum-alpha", "partition-ids",
})

PARTITION_IDS = "partition-ids"
COHORT = "cohort"
CLIENT_FAILED = 1  # Error code of a client that failed inside a cohort


def check_train_config(keys: Iterable[str]) -> None:
    """A misspelt key would silently fall back to a default on the client: refuse it, by name."""
    unknown = sorted(set(keys) - TRAIN_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in the train message's config "
                         f"(known: {', '.join(sorted(TRAIN_CONFIG_KEYS))})")


def optimizer_options(config: ConfigRecord, partition_id: int) -> dict:
    """The optimizer options a train message's config stands for: what ``fedsam.optim.build``
    passes on to a factory that names them (the server builds its check optimizer from them too)."""
    return {
        "partition_id": partition_id,
        "server_round": int(config["server-round"]),
        "lr": float(config["lr"]),
        "momentum": float(config.get("momentum", 0.0)),
        "weight_decay": float(config.get("weight-decay", 0.0)),
        "rho": config.get("rho"),
        "eta": config.get("eta"),
        "steps": config.get("fgsm-steps"),
        "ascent_momentum": config.get("ascent-momentum"),
    }


def split(partition_ids: list[int], workers: int) -> list[list[int]]:
    """``workers`` cohorts of near-equal size, dealt round-robin from the sorted ids."""
    ordered = sorted(partition_ids)
    return [ordered[i::workers] for i in range(min(workers, len(ordered)))]


def pack(results: dict[int, tuple[ArrayRecord, MetricRecord] | str]) -> RecordDict:
    """A worker's reply: each client's arrays and metrics, or the reason it failed."""
    content = RecordDict({COHORT: ConfigRecord({PARTITION_IDS: sorted(results)})})
    for pid, result in results.items():
        if isinstance(result, str):
            content[f"failed.{pid}"] = ConfigRecord({"reason": result})
        else:
            content[f"arrays.{pid}"], content[f"metrics.{pid}"] = result
    return content


def is_cohort_reply(reply: Message) -> bool:
    return not reply.has_error() and COHORT in reply.content


def failure(reply: Message, reason: str) -> Message:
    """An error reply standing for one client, shaped as if that client had failed."""
    return Message(error=Error(CLIENT_FAILED, reason), metadata=reply.metadata)


def unpack(reply: Message) -> dict[int, Message]:
    """One reply per client of a cohort reply, each shaped like a single client's reply."""
    out = {}
    for pid in reply.content[COHORT][PARTITION_IDS]:
        pid = int(pid)
        failed = reply.content.get(f"failed.{pid}")
        if failed is not None:
            out[pid] = failure(reply, str(failed["reason"]))
        elif f"arrays.{pid}" not in reply.content or f"metrics.{pid}" not in reply.content:
            out[pid] = failure(reply, f"the cohort reply lacks client {pid}'s arrays or metrics")
        else:
            content = RecordDict({"arrays": reply.content[f"arrays.{pid}"],
                                  "metrics": reply.content[f"metrics.{pid}"]})
            out[pid] = Message(content, metadata=reply.metadata)
    return out
