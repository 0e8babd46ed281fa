"""Client sampling that a seed reproduces, whatever node ids Flower hands out.

Flower's node ids are random each run, so sampling node ids, as Flower's strategies do, cannot
be repeated. Here the sample is drawn over *partition ids* from an RNG keyed by ``(seed, round)``
(so round 7 is the same draw whether or not rounds 1–6 ran in this process), and the nodes
are asked once for their partition id (``query.partition_id``) to route the messages.
"""

from __future__ import annotations

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


def query_partition_ids(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, int]:
    """``{partition id: node id}``, from each node's answer to ``query.partition_id``."""
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=PARTITION_QUERY)
                for node in node_ids]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(
                f"node {reply.metadata.src_node_id} did not say its partition id ({reply.error.reason}); "
                "seeded sampling needs ClientApps that answer query.partition_id, as fedsam.client_app does"
            )
        pid = int(reply.content["partition"]["partition-id"])
        if pid in mapping:
            raise RuntimeError(f"two nodes claim partition id {pid}")
        mapping[pid] = reply.metadata.src_node_id
    return mapping
