"""The Flower ClientApp: local training with any ``fedsam.optim`` optimizer on one partition, or,
in a simulation, on a cohort of partitions per message (``fedsam.wire``).

A train message carries the global arrays and a config (optimizer spec and options, lr, local
epochs, batch size, weight decay, momentum, gradient clipping, seed, and the data and split to
use); the drift-correcting strategies add the vectors ``fedsam.wire`` lists (momentum,
correction, FedSMOO's duals). The node's partition id comes from
``context.node_config["partition-id"]`` (``--node-config`` on a SuperNode, set by the
Simulation Engine otherwise); ``data-dir`` in the node config overrides the message's, for
nodes that keep the data elsewhere.

What a worker process keeps across rounds and clients (data, partition, models, optimizers) is
``fedsam.worker``'s.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsam import wire
from fedsam.cohort import PERTURBATION as BATCHED_RULE, train_cohort, use_batched
from fedsam.data import DeviceBatches, SingleExamples
from fedsam.optim import BUILTIN, SPARSE_SAM, DualSAM, FixedPerturbation, GlobalFlatSAM, SparseSAM
from fedsam.optim.ssam import SparseState, load_client_state
from fedsam.runtime import autocast_dtype, resolve_device, round_seed, use_cuda_graphs
from fedsam.train import LocalResult, train_locally
from fedsam.worker import cached_model, client_batches, client_indices, device_data, local_optimizer, partition_spec

app = ClientApp()

#: Built-ins whose step decides on the host (Sparse SAM's schedule and top-k): never a CUDA graph.
HOST_STEPPED = tuple(SPARSE_SAM)


def node_partition(node_config: dict, num_clients: int) -> int:
    """This node's partition id, checked against the run's number of clients."""
    if "partition-id" not in node_config:
        raise ValueError("this node has no 'partition-id' in its node config "
                         "(start it with --node-config \"partition-id=0 num-partitions=N data-dir='...'\")")
    try:
        pid = int(node_config["partition-id"])
    except (TypeError, ValueError):
        raise ValueError(f"partition-id must be an integer, got {node_config['partition-id']!r}") from None
    declared = int(node_config.get("num-partitions", num_clients))
    if declared != num_clients:
        raise ValueError(f"this node was started for {declared} partitions but the run has {num_clients} clients")
    if not 0 <= pid < num_clients:
        raise ValueError(f"partition-id {pid} is outside 0..{num_clients - 1}")
    return pid


def partition_of(context: Context, config: ConfigRecord) -> tuple[int, str]:
    """This node's partition id and data folder (``data-dir`` in the node config wins)."""
    pid = node_partition(context.node_config, int(config["num-clients"]))
    return pid, str(context.node_config.get("data-dir", config["data-dir"]))


@app.query("partition_id")
def answer_partition_id(msg: Message, context: Context) -> Message:
    """Lets the server map this node to its partition, for seeded client sampling, and checks the
    node's configuration before any training starts."""
    config, node = msg.content["config"], context.node_config
    num_clients = config.get("num-clients", node.get("num-partitions"))
    if num_clients is None:
        raise ValueError("the run did not say its number of clients, and this node has no 'num-partitions'")
    record = ConfigRecord({"partition-id": node_partition(node, int(num_clients))})
    return Message(RecordDict({"partition": record}), reply_to=msg)


def metric_record(result: LocalResult) -> MetricRecord:
    return MetricRecord({
        "num-examples": result.num_examples,
        "num-steps": result.num_steps,
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "seconds": result.seconds,
    })


def on_device(record: ArrayRecord | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    return None if record is None else {k: t.to(device) for k, t in record.to_torch_state_dict().items()}


def round_correction(content: RecordDict, pid: int, start: dict[str, torch.Tensor],
                     names: list[str], device: torch.device) -> dict[str, torch.Tensor] | None:
    """This client's constant direction term ``b = correction − a·w_{i,0}`` (``a``: ``anchor-pull``,
    FedProx's μ or FedDyn's λ), made once per round, or ``None`` when there is none."""
    correction = on_device(wire.client_record(content, wire.CORRECTION, pid), device)
    pull = wire.strategy_value(content["config"], "anchor-pull")
    if correction is None and pull == 0:
        return None
    out = {}
    for name in names:
        anchor = start[name].to(device)
        term = correction[name] if correction is not None else torch.zeros_like(anchor)
        out[name] = term - pull * anchor if pull != 0 else term
    return out


SPARSE_EPOCH = "__epoch__"  # beside the mask in Sparse SAM's optimizer-state record
FISHER_SEED_OFFSET = 1  # SSAM-F's example stream: the client's round seed + 1 (its minibatches use + 0)
MASK_SEED_OFFSET = 2  # SSAM-D's random draws: the client's round seed + 2


def sparse_state(content: RecordDict, pid: int, names: list[str], device: torch.device, mode: str,
                 seeded_batches: Callable[[int], DeviceBatches], seed: int) -> SparseState:
    """Sparse SAM in a federation (a project choice; the paper has none): the client's own mask
    and cumulative epoch count from its last round (``None`` and 0 the first time: the mode's
    initial mask); for SSAM-F, Fisher examples drawn from the client's own data with its training
    transforms (``seeded_batches(seed)``); for SSAM-D, a generator seeded per client and round so
    that the draws do not depend on which process trains the client (nor on whether its
    optimizer was kept from an earlier round). Both engines start from this."""
    record = wire.client_record(content, wire.OPTIMIZER_STATE, pid)
    state = None if record is None else record.to_torch_state_dict()
    return SparseState(
        mask=None if state is None else {n: state[n].to(device) for n in names},
        epoch=0 if state is None else int(state[SPARSE_EPOCH]),
        examples=SingleExamples(seeded_batches(seed + FISHER_SEED_OFFSET)) if mode == "fisher" else None,
        generator=torch.Generator().manual_seed(seed + MASK_SEED_OFFSET) if mode == "dynamic" else None)


def sparse_record(names: list[str], masks: list[torch.Tensor], epoch: int) -> ArrayRecord:
    """A client's Sparse SAM mask (1 byte an entry) and epoch count, for its next round."""
    state = {n: m.detach().cpu().bool() for n, m in zip(names, masks, strict=True)}
    state[SPARSE_EPOCH] = torch.tensor(epoch)
    return ArrayRecord(state)


def dual_record(names: list[str], duals: list[torch.Tensor]) -> ArrayRecord:
    """A client's FedSMOO dual ``u_i`` for the reply, on the host and detached from training."""
    return ArrayRecord({n: u.detach().cpu().clone() for n, u in zip(names, duals, strict=True)})


def train_partitions(content: RecordDict, partition_ids: list[int], data_dir: str,
                     isolate: bool) -> dict[int, dict[str, ArrayRecord | MetricRecord] | str]:
    """Train each listed partition from the message's global arrays: batched when ``fedsam.cohort``
    can and the run's ``vectorize`` setting allows, else one after another. With ``isolate`` an
    error in one client's training is that client's failure (its reason), not the whole call's: a
    batched cohort that raises is trained again one client at a time to find out whose it is."""
    config = content["config"]
    device = resolve_device(str(config["device"]))
    dataset = str(config["dataset"])
    data = device_data(dataset, data_dir, str(device))
    parts = client_indices(dataset, data_dir, partition_spec(config), str(device))
    model = cached_model(str(config["model"]), data.num_classes, str(config["norm"]), str(device))
    shared_start = content["arrays"].to_torch_state_dict()
    own = {pid: record.to_torch_state_dict() for pid in partition_ids
           if (record := content.get(f"arrays.{pid}")) is not None}  # relaxed initialisation's w_{i,0}
    starts = {pid: own.get(pid, shared_start) for pid in partition_ids}
    spec, epochs = str(config["optimizer"]), int(config["local-epochs"])
    momentum = on_device(content.get(wire.MOMENTUM), device)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    corrections = {pid: round_correction(content, pid, starts[pid], names, device) for pid in partition_ids}
    shift = on_device(content.get(wire.GLOBAL_PERTURBATION), device)
    point = on_device(content.get(wire.GLOBAL_POINT), device)  # FedGF's w̃, the same for every client
    no_duals = f"the message carries FedSMOO's duals but optimizer {spec!r} has none (use dual-sam)"
    seeds = {pid: round_seed(int(config["seed"]), int(config[wire.SERVER_ROUND]), pid) for pid in partition_ids}
    sparse_round = int(config[wire.SERVER_ROUND]) - 1  # SSAM-D's drop rate follows the global round
    graph_setting = str(config["cuda-graphs"])  # a plug-in's Python state would freeze in a graph
    graphs = (use_cuda_graphs(graph_setting, device) and (spec in BUILTIN or graph_setting == "on")
              and spec not in HOST_STEPPED)
    knobs = dict(grad_clip=float(config["grad-clip"]), global_momentum=momentum,
                 momentum_alpha=wire.strategy_value(config, "momentum-alpha"), cuda_graph=graphs,
                 direction_decay=wire.strategy_value(config, "direction-decay"),
                 autocast_dtype=autocast_dtype(str(config["precision"]), device))

    def batches(pid: int, seed: int | None = None) -> DeviceBatches:
        return client_batches(data, parts[pid], int(config["batch-size"]), seeds[pid] if seed is None else seed,
                              model, device)

    def sparse(pid: int) -> SparseState:
        return sparse_state(content, pid, names, device, SPARSE_SAM[spec], lambda seed: batches(pid, seed),
                            seeds[pid])

    num_clients = int(config["num-clients"])
    for pid in partition_ids:
        if not 0 <= pid < num_clients:
            raise ValueError(f"partition id {pid} is outside 0..{num_clients - 1}")
    vectorize = str(config["vectorize"])
    if not own and use_batched(vectorize, spec, model, device, len(partition_ids)):  # one start for all
        try:
            duals = [on_device(wire.client_record(content, wire.DUAL, pid), device) for pid in partition_ids]
            keeps_duals = BATCHED_RULE.get(spec) == "dual"
            keeps_masks = spec in SPARSE_SAM
            states = [sparse(pid) for pid in partition_ids] if keeps_masks else None
            if not keeps_duals and (shift is not None or any(u is not None for u in duals)):
                raise ValueError(no_duals)
            model.load_state_dict(shared_start)
            fixed = [on_device(wire.client_record(content, wire.PERTURBATION, pid), device) for pid in partition_ids]
            trained = train_cohort(model, spec, wire.optimizer_options(config, partition_ids[0]),
                                   [batches(pid) for pid in partition_ids], epochs,
                                   corrections=[corrections[pid] for pid in partition_ids],
                                   perturbations=None if all(e is None for e in fixed) else fixed,
                                   global_point=point, global_weight=wire.strategy_value(config, "gf-kappa"),
                                   duals=duals if keeps_duals else None, shift=shift,
                                   sparse=states, sparse_round=sparse_round, **knobs)
            replies = {pid: {"arrays": ArrayRecord(state), "metrics": metric_record(result)}
                       for pid, (state, result) in zip(partition_ids, trained)}
            if keeps_duals:  # FedSMOO: each client's u_i goes back, as from the one-client path
                for pid, u in zip(partition_ids, duals):
                    replies[pid][wire.DUAL] = dual_record(names, [u[n] for n in names])
            for pid, state in zip(partition_ids, states or []):  # Sparse SAM: each client's mask and epochs
                replies[pid][wire.OPTIMIZER_STATE] = sparse_record(names, [state.mask[n] for n in names], state.epoch)
            return replies
        except Exception as exc:  # noqa: BLE001 - retried client by client below, which says whose failure it is
            if not isolate:
                raise
            print(f"fedsam: a batched cohort failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  "training its clients one at a time", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    out: dict[int, dict[str, ArrayRecord | MetricRecord] | str] = {}
    for pid in partition_ids:
        try:
            torch.manual_seed(seeds[pid])
            model.load_state_dict(starts[pid])
            own_batches = batches(pid)  # made once (a padded copy of the client's images)
            optimizer = local_optimizer(model, spec, wire.optimizer_options(config, pid))
            dual = wire.client_record(content, wire.DUAL, pid)
            if isinstance(optimizer, DualSAM):  # FedSMOO: this client's u_i and the server's s, every round
                u = on_device(dual, device)
                optimizer.load_duals(None if u is None else [u[n] for n in names],
                                     None if shift is None else [shift[n] for n in names])
            elif dual is not None or shift is not None:
                raise ValueError(no_duals)
            if isinstance(optimizer, SparseSAM):
                load_client_state(optimizer, model, sparse(pid), names, len(own_batches), sparse_round)
            if isinstance(optimizer, GlobalFlatSAM):  # FedGF: the server's w̃ and κ
                optimizer.load_global(None if point is None else [point[n] for n in names],
                                      wire.strategy_value(config, "gf-kappa"))
            elif point is not None:
                raise ValueError(f"the message carries FedGF's global point but optimizer {spec!r} takes none "
                                 "(use gf-sam)")
            perturbation = on_device(wire.client_record(content, wire.PERTURBATION, pid), device)
            if isinstance(optimizer, FixedPerturbation):  # FedLESAM: this round's ε_i, or none
                optimizer.load_perturbation(None if perturbation is None else [perturbation[n] for n in names])
            elif perturbation is not None:
                raise ValueError(f"the message carries FedLESAM's perturbation but optimizer {spec!r} takes none "
                                 "(use lesam)")
            result = train_locally(model, optimizer, own_batches, epochs, num_examples=len(parts[pid]),
                                   correction=corrections[pid], **knobs)
            out[pid] = {"arrays": ArrayRecord(model.state_dict()), "metrics": metric_record(result)}
            if isinstance(optimizer, DualSAM):
                out[pid][wire.DUAL] = dual_record(names, optimizer.duals())
            if isinstance(optimizer, SparseSAM):  # the mask and epoch count, kept for this client's next round
                out[pid][wire.OPTIMIZER_STATE] = sparse_record(names, optimizer.mask(), optimizer.epoch)
        except Exception as exc:  # noqa: BLE001 - one client's failure, reported for that client
            if not isolate:
                raise
            out[pid] = f"{type(exc).__name__}: {exc}"
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    wire.check_train_config(config)
    pid, data_dir = partition_of(context, config)
    if wire.PARTITION_IDS in config:  # a simulation's worker, training a cohort of clients
        cohort = [int(p) for p in config[wire.PARTITION_IDS]]
        return Message(wire.pack(train_partitions(msg.content, cohort, data_dir, isolate=True)), reply_to=msg)
    return Message(RecordDict(train_partitions(msg.content, [pid], data_dir, isolate=False)[pid]), reply_to=msg)
