"""Model-shaped vectors on the server, and the per-client state table of the drift-correcting methods.

A *vector* is a dict from array name to a float64 numpy array: the server does its bookkeeping
(``Δ_i``, SCAFFOLD's ``c``, FedDyn's ``h̄``, FedCM's ``m``) in float64 and casts to the model's
dtype only when it sends or stores.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

Vector = dict[str, np.ndarray]


def floats(record: ArrayRecord, keys: Iterable[str] | None = None) -> Vector:
    """The floating-point arrays of ``record`` (or those named ``keys``) as float64."""
    names = keys if keys is not None else [k for k, a in record.items()
                                           if np.issubdtype(np.dtype(a.dtype), np.floating)]
    return {k: record[k].numpy().astype(np.float64) for k in names}


def zeros_like(vector: Vector) -> Vector:
    return {k: np.zeros_like(v) for k, v in vector.items()}


def add(a: Vector, b: Vector, scale: float = 1.0) -> Vector:
    """``a + scale·b`` over ``a``'s arrays."""
    return {k: a[k] + scale * b[k] for k in a}


def sub(a: Vector, b: Vector) -> Vector:
    return {k: a[k] - b[k] for k in a}


def scaled(a: Vector, factor: float) -> Vector:
    return {k: factor * v for k, v in a.items()}


def weighted_mean(vectors: list[Vector], weights: list[float]) -> Vector:
    """``Σ w_i x_i / Σ w_i``."""
    out = zeros_like(vectors[0])
    for vector, weight in zip(vectors, weights):
        for k in out:
            out[k] += weight * vector[k]
    total = float(sum(weights))
    return {k: v / total for k, v in out.items()}


def mean(vectors: list[Vector]) -> Vector:
    return weighted_mean(vectors, [1.0] * len(vectors))


def norm(a: Vector) -> float:
    """‖a‖₂ over all arrays together."""
    return float(np.sqrt(sum(float(np.sum(np.square(v))) for v in a.values())))


def to_record(vector: Vector, like: ArrayRecord) -> ArrayRecord:
    """``vector`` as an ArrayRecord in the dtypes of ``like``'s arrays of the same names."""
    return ArrayRecord({k: Array(np.asarray(v.astype(like[k].numpy().dtype))) for k, v in vector.items()})


class ClientStates:
    """One vector per client, kept on the server between rounds (``c_i``, ``h_i``, ``u_i``, ...).

    A client that has never been sampled has no entry and reads as zero, so the table holds only
    the clients that have taken part: at most ``N × P`` numbers in the model's dtype (100 clients
    × an 11 M-parameter ResNet-18 is 4.4 GB in float32), none for a method that keeps no state.
    Only a sampled client's entry is ever written (algorithms-family.md, 0.5).
    """

    def __init__(self) -> None:
        self.entries: dict[int, dict[str, np.ndarray]] = {}

    def get(self, partition_id: int, like: Vector) -> Vector:
        """The client's vector in float64 (zeros before its first participation)."""
        stored = self.entries.get(partition_id)
        if stored is None:
            return zeros_like(like)
        return {k: stored[k].astype(np.float64) for k in like}

    def has(self, partition_id: int) -> bool:
        return partition_id in self.entries

    def set(self, partition_id: int, vector: Vector, like: ArrayRecord) -> Vector:
        """Store in the model's dtypes (``like``), as new arrays (``state`` relies on it), and return
        how the stored entry changed, in float64: a running mean over the table (SCAFFOLD's ``c``,
        FedDyn's ``h̄``, FedGloSS's ``σ``) must add the stored change, not the unrounded one, or it
        drifts away from the mean of the stored vectors by a rounding error every round."""
        before = self.get(partition_id, vector)
        stored = {k: v.astype(like[k].numpy().dtype, copy=True) for k, v in vector.items()}
        self.entries[partition_id] = stored
        return {k: v.astype(np.float64) - before[k] for k, v in stored.items()}

    def state(self) -> dict[str, Any]:
        """For the checkpoint: tensors keyed by partition id (as a string) and array name. The run
        takes this before every round (to fall back to if a worker dies), so it shares the arrays
        rather than copying a table of ``N × P`` numbers each time."""
        return {str(pid): {k: torch.from_numpy(v) for k, v in vec.items()}  # shared, not copied: entries are
                for pid, vec in self.entries.items()}                         # replaced, never changed in place

    def restore(self, state: dict[str, Any]) -> None:
        self.entries = {int(pid): {k: t.numpy().copy() for k, t in vec.items()} for pid, vec in state.items()}


def vector_state(vector: Vector | None) -> dict[str, torch.Tensor] | None:
    """A float64 vector for the checkpoint."""
    return None if vector is None else {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vector.items()}


def vector_from_state(state: dict[str, torch.Tensor] | None) -> Vector | None:
    return None if state is None else {k: t.numpy().astype(np.float64) for k, t in state.items()}


def weighted_arrays(key: str, updates_arrays: list[ArrayRecord], weights: list[float]) -> Array:
    """One array that is no trainable parameter (BatchNorm's statistics) across clients: the weighted
    mean for floats, the first client's for counters (``num_batches_tracked``)."""
    first = updates_arrays[0][key]
    if not np.issubdtype(np.dtype(first.dtype), np.floating):
        return first
    values = [a[key].numpy().astype(np.float64) for a in updates_arrays]
    mean = sum(w * v for w, v in zip(weights, values)) / float(sum(weights))
    return Array(np.asarray(mean.astype(first.numpy().dtype)))
