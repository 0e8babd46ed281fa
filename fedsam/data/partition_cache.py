"""Splits made once per machine, not once per process.

A run's server and each of its Ray workers need the same split, and a sweep's runs often share
one. Drawing it costs about 2 s a process, nearly all of it importing flwr-datasets (and, through
it, Hugging Face ``datasets``); on two cores the workers paid that side by side in round 1. So
the first process to make a split writes it here and the rest read it back in milliseconds.

A split is a pure function of the labels, its spec and the code that draws it, so the file's name
is a hash of exactly those: the labels' bytes, the number of classes, every field of the spec,
this package's ``partition.py`` source and the versions of flwr-datasets, ``datasets`` and
numpy. A file is checked before it is used (the spec's number of clients, no sample twice, every
sample accounted for); one that fails, or cannot be read, is made again. The checks catch a
damaged file; that a file is *this* split rests on the key. The cache only ever saves time: where
it cannot be found, read or written, it is skipped without a word.

Where: ``$FEDSAM_CACHE/partitions``, else ``$XDG_CACHE_HOME/fedsam/partitions``, else
``~/.cache/fedsam/partitions``. ``FEDSAM_CACHE=off`` turns it off.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from fedsam.data import partition as drawing
from fedsam.data.partition import Partition, PartitionSpec, make_partition

CACHE_ENV = "FEDSAM_CACHE"
OFF = "off"


def cache_dir() -> Path | None:
    """Where splits are kept (absolute, so every process of a run finds the same folder), or
    ``None`` when the cache is off or there is no home to keep it in."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() == OFF:
        return None
    try:
        if setting:
            return Path(setting).expanduser().resolve() / "partitions"
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base).expanduser().resolve() / "fedsam" / "partitions"
    except (RuntimeError, OSError):  # no HOME, or a path that cannot be resolved
        return None


@functools.cache
def _code_version() -> str:
    """What else decides the draw: the drawing code and the libraries it calls."""
    versions = []
    for dist in ("flwr-datasets", "datasets", "numpy"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=?")
    source = hashlib.sha256(Path(drawing.__file__).read_bytes()).hexdigest()
    return ";".join([source, *versions])


def cache_key(labels: np.ndarray, spec: PartitionSpec, num_classes: int) -> str:
    """The file name of this split: a hash of everything the draw depends on."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(repr((num_classes, dataclasses.astuple(spec), _code_version())).encode())
    return digest.hexdigest()


def _read(path: Path, spec: PartitionSpec, num_samples: int) -> Partition | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            clients = [stored[f"client_{i}"].astype(np.int64) for i in range(spec.num_clients)]
            unassigned = stored["unassigned"].astype(np.int64)
            moved = int(stored["moved"])
            extra = len(stored.files) - spec.num_clients - 2
        everything = np.concatenate([*clients, unassigned])
    except Exception:  # noqa: BLE001 - truncated, not a zip, wrong shapes: any of it means "draw again"
        return None
    if extra != 0 or everything.ndim != 1 or len(everything) != num_samples:
        return None
    if everything.min(initial=0) < 0 or everything.max(initial=0) >= num_samples:
        return None
    if np.bincount(everything, minlength=num_samples).max(initial=0) > 1:
        return None
    return Partition(spec, clients, unassigned, moved)


def _write(path: Path, partition: Partition) -> None:
    arrays = {f"client_{i}": c for i, c in enumerate(partition.clients)}
    scratch = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            np.savez(out, unassigned=partition.unassigned, moved=np.int64(partition.moved_to_empty_clients), **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(scratch, path)  # atomic: a reader sees the whole file or none
        scratch = None
    except OSError:
        pass
    finally:
        if scratch is not None:
            Path(scratch).unlink(missing_ok=True)


def cached_partition(labels: np.ndarray, spec: PartitionSpec, num_classes: int) -> Partition:
    """``make_partition``'s split, read from this machine's cache when a process made it before."""
    labels = np.asarray(labels, dtype=np.int64)
    spec.validate(len(labels), num_classes)  # the same one-line errors, cached or not
    folder = cache_dir()
    if folder is None:
        return make_partition(labels, spec, num_classes)
    path = folder / f"{cache_key(labels, spec, num_classes)}.npz"
    try:
        found = _read(path, spec, len(labels)) if path.is_file() else None
    except OSError:  # a folder this process may not search
        found = None
    if found is not None:
        return found
    made = make_partition(labels, spec, num_classes)
    _write(path, made)
    return made
