"""How heterogeneous a split is, in numbers, and the ``partition.json`` artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .partition import Partition


def label_counts(partition: Partition, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``clients × classes`` matrix of sample counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in partition.clients])


def summarize(partition: Partition, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Client sizes, classes per client, and the mean total-variation distance
    ``½ Σ_c |p_i(c) − p(c)|`` between each client's label distribution and the training set's."""
    counts = label_counts(partition, labels, num_classes)
    sizes = counts.sum(axis=1)
    overall = np.bincount(np.asarray(labels), minlength=num_classes) / len(labels)
    per_client = counts / np.maximum(sizes[:, None], 1)
    tv = 0.5 * np.abs(per_client - overall).sum(axis=1)
    return {
        "num_clients": len(sizes),
        "assigned": int(sizes.sum()),
        "unassigned": int(len(partition.unassigned)),
        "moved_to_empty_clients": int(partition.moved_to_empty_clients),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
        "classes_per_client_mean": float((counts > 0).sum(axis=1).mean()),
        "tv_distance_mean": float(tv.mean()),
    }


def format_summary(dataset: str, partition: Partition, summary: dict[str, Any], total: int) -> str:
    spec = partition.spec
    lines = [
        f"{dataset} · {spec.describe()} · {spec.num_clients} clients · seed {spec.seed}",
        f"  samples             {summary['assigned']} assigned of {total}"
        + (f" ({summary['unassigned']} in classes no client drew)" if summary["unassigned"] else ""),
        f"  client size         min {summary['size_min']} · median {summary['size_median']:g} · max {summary['size_max']}",
        f"  classes per client  {summary['classes_per_client_mean']:.2f} (mean)",
        f"  label TV distance   {summary['tv_distance_mean']:.3f} (mean over clients; 0 = the global mix)",
    ]
    if summary["moved_to_empty_clients"]:
        lines.append(f"  empty clients       {summary['moved_to_empty_clients']} filled with one sample each")
    return "\n".join(lines)


def partition_record(dataset: str, partition: Partition, summary: dict[str, Any]) -> dict[str, Any]:
    """What ``partition.json`` holds: the split's spec, its summary and every client's indices."""
    spec = partition.spec
    return {
        "dataset": dataset,
        "partition": spec.scheme,
        "params": spec.params(),
        "seed": spec.seed,
        "num_clients": spec.num_clients,
        "summary": summary,
        "unassigned": partition.unassigned.tolist(),
        "moved_to_empty_clients": partition.moved_to_empty_clients,
        "clients": [c.tolist() for c in partition.clients],
    }


def write_partition_json(path: str | Path, dataset: str, partition: Partition, summary: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(partition_record(dataset, partition, summary)) + "\n")
