"""Split a training set across clients the ways the heterogeneity literature does.

| scheme | definition | implementation |
|---|---|---|
| ``iid`` | shuffle, split into equal parts (sizes differ by at most one) | flwr-datasets ``IidPartitioner`` on a seeded shuffle |
| ``dirichlet`` | per class, proportions across clients ``~ Dir(α)`` (Hsu et al. 2019) | ``DirichletPartitioner``, one draw |
| ``dirichlet-equal`` | per client, class priors ``~ Dir(α)``, equal sizes (FedDyn, FL-Simulator) | here (see below) |
| ``pathological`` | each client holds exactly ``k`` classes (McMahan et al.) | ``PathologicalPartitioner``, first class deterministic |
| ``quantity`` | IID labels, sizes ``N · q`` with ``q ~ Dir(α)`` (Li et al.'s quantity skew) | ``SizePartitioner`` on a seeded shuffle |

Every scheme is a pure function of the labels, the scheme, its parameters and the seed, so any
process (a Ray worker, a SuperNode on another machine) derives the same split.

``dirichlet-equal`` is written here rather than taken from flwr-datasets: its
``InnerDirichletPartitioner`` fails with "Probabilities contain NaN" at small α (a client whose
prior mass sits on classes already used up is left with an all-zero distribution). Here clients
are filled one sample at a time in a seeded random order; each sample's class is drawn from the
client's prior restricted to the classes that still have samples, and a client whose prior has
no mass left on those classes draws in proportion to what remains.

Coverage: every training sample goes to exactly one client, with one exception: in
``pathological``, classes that no client draws (possible only when ``clients · k`` is below the
number of classes) are left out and listed as ``unassigned``.

Empty clients: no client is ever empty. A client a scheme would leave with no sample (possible
in ``dirichlet`` with small α, and in ``pathological`` when a class has fewer samples than
clients holding it) receives one sample, drawn at random (seeded) from the largest client. The
number of samples moved this way is recorded as ``moved_to_empty_clients``; it is 0 unless a
client would have been empty, and never more than the number of clients. (Redrawing until no
client is small, as some code does, would condition the Dirichlet draw for every client and
can fail outright for small α and many clients.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

SCHEMES = ("iid", "dirichlet", "dirichlet-equal", "pathological", "quantity")
USES_ALPHA = ("dirichlet", "dirichlet-equal", "quantity")


class PartitionError(ValueError):
    """A partition that cannot be made with these parameters."""


@dataclass(frozen=True)
class PartitionSpec:
    """What defines a split: given the same labels, the same spec gives the same clients."""

    scheme: str
    num_clients: int
    seed: int = 0
    dirichlet_alpha: float | None = None
    classes_per_client: int | None = None

    def params(self) -> dict[str, float | int]:
        """The scheme's own parameters, as recorded next to it (α means different things per scheme)."""
        if self.scheme in USES_ALPHA:
            return {"dirichlet_alpha": self.dirichlet_alpha}
        if self.scheme == "pathological":
            return {"classes_per_client": self.classes_per_client}
        return {}

    def describe(self) -> str:
        params = ", ".join(f"{k.replace('dirichlet_alpha', 'α').replace('_', ' ')}={v}" for k, v in self.params().items())
        return f"{self.scheme}" + (f" ({params})" if params else "")

    def validate(self, num_samples: int, num_classes: int) -> None:
        if self.scheme not in SCHEMES:
            raise PartitionError(f"unknown partition scheme {self.scheme!r} (known: {', '.join(SCHEMES)})")
        if self.num_clients < 1:
            raise PartitionError(f"the number of clients must be >= 1, got {self.num_clients}")
        if self.num_clients > num_samples:
            raise PartitionError(f"{self.num_clients} clients but only {num_samples} training samples")
        if self.scheme in USES_ALPHA:
            alpha = self.dirichlet_alpha
            if alpha is None or not alpha > 0 or alpha == float("inf"):
                raise PartitionError(f"{self.scheme} needs a finite dirichlet alpha > 0, got {alpha}")
        if self.scheme == "pathological":
            k = self.classes_per_client
            if k is None or k < 1:
                raise PartitionError(f"pathological needs classes per client >= 1, got {k}")
            if k > num_classes:
                raise PartitionError(f"{k} classes per client but the dataset has only {num_classes} classes")


@dataclass
class Partition:
    spec: PartitionSpec
    clients: list[np.ndarray]
    unassigned: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    moved_to_empty_clients: int = 0

    def sizes(self) -> np.ndarray:
        return np.array([len(c) for c in self.clients])


def _label_dataset(labels: np.ndarray):
    """A labels-only in-memory dataset, so flwr-datasets' partitioners run without any download."""
    import datasets  # heavy import, needed only here

    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict({"label": labels.tolist(), "index": np.arange(len(labels)).tolist()})


def _split(partitioner, dataset, num_clients: int) -> list[np.ndarray]:
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets warns about choices we make on purpose
        return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_clients)]


def _equal_sizes(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _dirichlet_sizes(total: int, parts: int, alpha: float, rng: np.random.Generator) -> list[int]:
    """``N · q``, ``q ~ Dir(α)``, rounded by largest remainder, at least one sample each."""
    share = rng.dirichlet(np.full(parts, alpha)) * (total - parts)
    sizes = np.floor(share).astype(np.int64)
    short = (total - parts) - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
    return (sizes + 1).tolist()


def _dirichlet_equal(labels: np.ndarray, num_classes: int, num_clients: int, alpha: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    priors = rng.dirichlet(np.full(num_classes, alpha), size=num_clients)
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
    left = np.array([len(pool) for pool in pools], dtype=np.float64)
    taken = np.zeros(num_classes, dtype=np.int64)
    slots = rng.permutation(np.repeat(np.arange(num_clients), _equal_sizes(len(labels), num_clients)))
    draws = rng.random(len(slots))
    chosen = np.empty(len(slots), dtype=np.int64)
    for t, (client, u) in enumerate(zip(slots, draws)):
        weights = priors[client] * (left > 0)
        total = weights.sum()
        if not total > 0:
            weights, total = left, left.sum()
        k = min(int(np.searchsorted(np.cumsum(weights), u * total, side="right")), num_classes - 1)
        while left[k] == 0:  # guard against rounding at the top of the cumulative sum
            k -= 1
        chosen[t] = pools[k][taken[k]]
        taken[k] += 1
        left[k] -= 1
    order = np.argsort(slots, kind="stable")
    bounds = np.cumsum(np.bincount(slots, minlength=num_clients))[:-1]
    return [rng.permutation(part) for part in np.split(chosen[order], bounds)]


def _fill_empty_clients(clients: list[np.ndarray], rng: np.random.Generator) -> int:
    moved = 0
    for i in range(len(clients)):
        if len(clients[i]) == 0:
            donor = int(np.argmax([len(c) for c in clients]))
            j = int(rng.integers(len(clients[donor])))
            clients[i] = clients[donor][j:j + 1].copy()
            clients[donor] = np.delete(clients[donor], j)
            moved += 1
    return moved


def make_partition(labels: np.ndarray, spec: PartitionSpec, num_classes: int) -> Partition:
    """Split ``range(len(labels))`` across ``spec.num_clients`` clients."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        SizePartitioner,
    )

    labels = np.asarray(labels, dtype=np.int64)
    spec.validate(len(labels), num_classes)
    n, c, seed = len(labels), spec.num_clients, spec.seed
    dataset = _label_dataset(labels)
    rng = np.random.default_rng([seed, 2024])  # for what flwr-datasets does not draw itself
    try:
        if spec.scheme == "iid":
            clients = _split(IidPartitioner(c), dataset.shuffle(seed=seed), c)
        elif spec.scheme == "dirichlet":
            partitioner = DirichletPartitioner(c, "label", float(spec.dirichlet_alpha), min_partition_size=0,
                                               self_balancing=False, shuffle=True, seed=seed)
            clients = _split(partitioner, dataset, c)
        elif spec.scheme == "dirichlet-equal":
            clients = _dirichlet_equal(labels, num_classes, c, float(spec.dirichlet_alpha), rng)
        elif spec.scheme == "pathological":
            partitioner = PathologicalPartitioner(c, "label", int(spec.classes_per_client),
                                                  class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
            clients = _split(partitioner, dataset, c)
        else:  # quantity
            sizes = _dirichlet_sizes(n, c, float(spec.dirichlet_alpha), rng)
            clients = _split(SizePartitioner(sizes), dataset.shuffle(seed=seed), c)
    except ValueError as exc:  # flwr-datasets' own infeasibility messages
        raise PartitionError(f"cannot make a {spec.describe()} partition of {n} samples for {c} clients: {exc}") from exc

    moved = _fill_empty_clients(clients, rng)
    assigned = np.concatenate(clients) if clients else np.zeros(0, dtype=np.int64)
    unassigned = np.setdiff1d(np.arange(n), assigned)
    return Partition(spec, clients, unassigned, moved)
