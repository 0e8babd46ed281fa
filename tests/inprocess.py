"""A Flower Grid that hands each message straight to a ClientApp in this process: the server's
round loop and the strategies run exactly as under Ray, without Ray."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsam.client_app import app
from simulations.experiment import check, run_experiment, write_run_files


def ensure_task_identity() -> None:
    try:
        TaskIdentity.run_id  # noqa: B018 - raises when unset
    except RuntimeError:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class InProcessGrid(Grid):
    def __init__(self, client_app, num_nodes: int, node_config: dict | None = None, id_seed: int = 7):
        # Node ids are arbitrary and unordered, as Flower's are; partition ids are 0..n-1.
        self.node_ids = [(id_seed * 7919 + 104729 * (pid + 1)) % 2**31 for pid in range(num_nodes)]
        self.app = client_app
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": pid, "num-partitions": num_nodes, **(node_config or {})})
            for pid, node in enumerate(self.node_ids)
        }
        self.delivered: list[Message] = []
        # Messages take their run and sender from the process's task identity (the ServerApp's).
        ensure_task_identity()

    def set_run(self, run) -> None:  # pragma: no cover - not needed here
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.delivered.append(message)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # a client gets one core, as a Ray actor with --num-cpus-per-client 1
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - Flower turns ClientApp exceptions into error replies
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=message)
            finally:
                torch.set_num_threads(threads)
            replies.append(reply)
        return replies


def run_inprocess(cfg, grid=None, **kwargs):
    """The run in this process: clients on one thread each (see ``InProcessGrid``) and the server's
    evaluation on all of them, as ``fedsam run`` does under Ray with --num-cpus-per-client 1."""
    out = Path(cfg.out)
    checked = check(cfg, None if kwargs.get("resume") else out)
    if not kwargs.get("resume"):
        write_run_files(checked, out)
    return run_experiment(grid or InProcessGrid(app, cfg.num_clients), cfg, out, data=checked.data, echo=False,
                          **kwargs)
