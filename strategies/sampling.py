"""Client sampling that a seed reproduces, whatever node ids Flower hands out.

Flower's node ids are random each run, so sampling node ids, as Flower's strategies do, cannot
be repeated. Here the sample is drawn over *partition ids* from an RNG keyed by ``(seed, round)``
(so round 7 is the same draw whether or not rounds 1–6 ran in this process), and the nodes
are asked once for their partition id (``query.partition_id``) to route the messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

PARTITION_QUERY = "query.partition_id"


class ClientSampler:
    """``uniform``: exactly ``per_round`` distinct clients; ``bernoulli``: each client joins with
    probability ``per_round / num_clients`` (redrawn if nobody joins), as in FL-Simulator."""

    def __init__(self, num_clients: int, per_round: int, seed: int, mode: str = "uniform") -> None:
        if not 1 <= per_round <= num_clients:
            raise ValueError(f"clients per round must be in 1..{num_clients}, got {per_round}")
        if mode not in ("uniform", "bernoulli"):
            raise ValueError(f"unknown sampling mode {mode!r} (uniform or bernoulli)")
        self.num_clients, self.per_round, self.seed, self.mode = num_clients, per_round, seed, mode

    def sample(self, server_round: int) -> list[int]:
        rng = np.random.default_rng([self.seed, server_round, 0x5A3])
        if self.mode == "uniform":
            return sorted(rng.choice(self.num_clients, size=self.per_round, replace=False).tolist())
        p = self.per_round / self.num_clients
        while True:
            chosen = np.flatnonzero(rng.random(self.num_clients) < p)
            if len(chosen):
                return chosen.tolist()


class NodeSetupError(RuntimeError):
    """The nodes cannot serve this run (a missing or out-of-range partition id, ...)."""


def short_reason(text: str) -> str:
    """One line of a client's error: the ClientApp's own message out of the pages of wrapping and
    traceback that Flower and Ray put around it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text or "").strip()
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    else:
        raised = [line for line in text.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line.strip())]
        if raised:
            text = raised[-1].strip()
    if ":<'" in text.partition("\n")[0]:  # Flower's "<class 'X'>:<'message'>"
        text = text.split(":<'", 1)[1]
    first = text.strip().strip("'>").strip().splitlines()
    return first[0][:300] if first else ""


def query_partition_ids(grid: Grid, node_ids: Iterable[int], timeout: float,
                        num_clients: int | None = None) -> dict[int, int]:
    """``{partition id: node id}``, from each node's answer to ``query.partition_id``.

    With ``num_clients``, each node also checks its partition id against the run, so a node
    started with a wrong or missing id stops the run before any training."""
    config = ConfigRecord({} if num_clients is None else {"num-clients": num_clients})
    node_ids = list(node_ids)
    messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type=PARTITION_QUERY)
                for node in node_ids]
    mapping: dict[int, int] = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        if reply.has_error():
            raise NodeSetupError(
                f"node {reply.metadata.src_node_id} cannot serve this run: {short_reason(reply.error.reason)} "
                "(seeded sampling needs ClientApps that answer query.partition_id, as fedsam.client_app does)"
            )
        pid = int(reply.content["partition"]["partition-id"])
        if pid in mapping:
            raise NodeSetupError(f"two nodes claim partition id {pid}")
        mapping[pid] = reply.metadata.src_node_id
    if len(replies) < len(node_ids):
        raise NodeSetupError(f"only {len(replies)} of {len(node_ids)} nodes answered within {timeout:.0f} s")
    return mapping
