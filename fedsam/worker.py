"""What a worker process keeps across rounds and clients, so a round costs only a gather of the
client's images, a ``load_state_dict`` and the training: the dataset on the training device, the
partition (every process derives the same one from the dataset, scheme, parameters and seed), one
model per architecture and the built-in optimizers.

The ClientApp trains with these; ``fedsam bench``'s plain loop uses the same ones, so the two do
the same client work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord

from fedsam.data import DeviceBatches, PartitionSpec, cached_partition, load
from fedsam.models import build_model, has_batch_norm
from fedsam.optim import BUILTIN, asam_param_groups, build, restart
from fedsam.runtime import keep_freed_memory, memory_format


@dataclass(frozen=True)
class DeviceData:
    images: torch.Tensor
    labels: torch.Tensor
    labels_numpy: np.ndarray
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@lru_cache(maxsize=2)
def device_data(dataset: str, data_dir: str, device: str) -> DeviceData:
    keep_freed_memory()  # in every process that trains clients (Ray workers, the bench's plain loop); idempotent
    data = load(dataset, data_dir)
    return DeviceData(data.train_images.to(device), data.train_labels.to(device), data.train_labels.numpy(),
                      data.num_classes, data.mean, data.std)


@lru_cache(maxsize=4)
def client_indices(dataset: str, data_dir: str, spec: PartitionSpec, device: str) -> tuple[torch.Tensor, ...]:
    data = device_data(dataset, data_dir, device)
    partition = cached_partition(data.labels_numpy, spec, data.num_classes)
    return tuple(torch.from_numpy(idx).to(device) for idx in partition.clients)


@lru_cache(maxsize=4)
def cached_model(name: str, num_classes: int, norm: str, device: str) -> torch.nn.Module:
    model = build_model(name, num_classes, norm).to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)  # what cuDNN's fastest convolutions want
    return model


_optimizers: dict[tuple, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
OPTIMIZER_CACHE = 8


def optimizer_params(model: torch.nn.Module, spec: str, options: dict) -> Any:
    """What a client's optimizer is built over: ASAM's groups by the run's scope (they need the
    parameters' names), the bare parameters for everything else (a plug-in's contract)."""
    return asam_param_groups(model, options["asam_scope"]) if spec == "asam" else model.parameters()


def local_optimizer(model: torch.nn.Module, spec: str, options: dict) -> torch.optim.Optimizer:
    """A fresh-acting optimizer for this round. The built-ins are kept per worker process and
    ``restart``-ed (momentum zeroed in place, the round's lr set); custom specs are built anew."""
    params = optimizer_params(model, spec, options)
    if spec not in BUILTIN:
        return build(spec, params, **options)
    fixed = tuple(sorted((k, v) for k, v in options.items() if k not in ("lr", "partition_id", "server_round")))
    key = (id(model), spec, fixed)
    kept = _optimizers.get(key)
    if kept is not None and kept[0] is model:  # the same model object, not a new one at a reused id
        restart(kept[1], float(options["lr"]))
        return kept[1]
    optimizer = build(spec, params, **options)
    if len(_optimizers) >= OPTIMIZER_CACHE:
        _optimizers.pop(next(iter(_optimizers)))
    _optimizers[key] = (model, optimizer)
    return optimizer


def client_batches(data: DeviceData, indices: torch.Tensor, batch_size: int, seed: int, model: torch.nn.Module,
                   device: torch.device) -> DeviceBatches:
    """One client's shuffled, augmented training minibatches, as every client trains on them: a
    lone last sample is its own minibatch (the spec's ``⌈n/b⌉`` steps) unless the model has
    BatchNorm, which cannot train on one."""
    return DeviceBatches(data.images[indices], data.labels[indices], batch_size, mean=data.mean, std=data.std,
                         augment=True, shuffle=True, seed=seed, memory_format=memory_format(device),
                         fold_lone_last=has_batch_norm(model))


def partition_spec(config: ConfigRecord) -> PartitionSpec:
    return PartitionSpec(str(config["partition"]), int(config["num-clients"]), int(config["seed"]),
                         float(config["dirichlet-alpha"]), int(config["classes-per-client"]))
