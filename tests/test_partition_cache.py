"""The machine-wide split cache: a hit is the very split ``make_partition`` draws, the key follows
everything the draw depends on, a bad file is drawn again, and a warm process never imports
flwr-datasets (the start-up it exists to save)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedsam.data import PartitionError, PartitionSpec, make_partition
from fedsam.data import partition_cache
from fedsam.data.partition_cache import CACHE_ENV, cache_key, cached_partition
from tests.helpers import ROOT

LABELS = np.random.default_rng(1).permutation(np.arange(600) % 10)
SCHEMES = {"iid": {}, "dirichlet": {"dirichlet_alpha": 0.1}, "dirichlet-equal": {"dirichlet_alpha": 0.3},
           "pathological": {"classes_per_client": 1}, "quantity": {"dirichlet_alpha": 0.5}}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path / "partitions"


def _spec(scheme, clients=7, seed=3):
    return PartitionSpec(scheme, clients, seed, **SCHEMES[scheme])


def _same(a, b):
    assert len(a.clients) == len(b.clients)
    assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a.clients, b.clients))
    assert np.array_equal(a.unassigned, b.unassigned)
    assert a.moved_to_empty_clients == b.moved_to_empty_clients and a.spec == b.spec


def _no_drawing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the split was drawn again instead of read from the cache")

    monkeypatch.setattr(partition_cache, "make_partition", refuse)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_hit_is_exactly_the_drawn_split_and_draws_nothing(scheme, cache, monkeypatch):
    # pathological with 7 clients x 1 class leaves classes unassigned; dirichlet at α=0.1 may move samples
    spec = _spec(scheme)
    drawn = make_partition(LABELS, spec, 10)
    _same(cached_partition(LABELS, spec, 10), drawn)  # a miss: drawn and written
    assert len(list(cache.glob("*.npz"))) == 1
    _no_drawing(monkeypatch)
    _same(cached_partition(LABELS, spec, 10), drawn)


def test_the_key_follows_labels_spec_and_classes():
    spec = _spec("dirichlet")
    key = cache_key(LABELS, spec, 10)
    assert key == cache_key(LABELS.copy(), PartitionSpec("dirichlet", 7, 3, dirichlet_alpha=0.1), 10)
    changed = [cache_key(np.roll(LABELS, 1), spec, 10), cache_key(LABELS, spec, 11),
               cache_key(LABELS, _spec("dirichlet", seed=4), 10), cache_key(LABELS, _spec("dirichlet", clients=8), 10),
               cache_key(LABELS, PartitionSpec("dirichlet", 7, 3, dirichlet_alpha=0.2), 10),
               cache_key(LABELS, PartitionSpec("dirichlet-equal", 7, 3, dirichlet_alpha=0.1), 10)]
    assert key not in changed and len(set(changed)) == len(changed)


def test_the_key_follows_the_drawing_code_and_libraries(monkeypatch):
    key = cache_key(LABELS, _spec("iid"), 10)
    monkeypatch.setattr(partition_cache, "_code_version", lambda: "partition.py edited;numpy=9.9")
    assert cache_key(LABELS, _spec("iid"), 10) != key


@pytest.mark.parametrize("damage", ["garbage", "truncated", "duplicate", "too few clients", "out of range"])
def test_a_damaged_file_is_drawn_again_and_replaced(damage, cache, monkeypatch):
    spec = _spec("dirichlet")
    drawn = make_partition(LABELS, spec, 10)
    cached_partition(LABELS, spec, 10)
    (path,) = cache.glob("*.npz")
    clients = [c.copy() for c in drawn.clients]
    if damage == "garbage":
        path.write_bytes(b"not a numpy archive")
    elif damage == "truncated":  # still starts like a zip archive
        path.write_bytes(path.read_bytes()[:200])
    else:
        if damage == "duplicate":
            clients[1][0] = clients[0][0]
        elif damage == "out of range":
            clients[1][0] = len(LABELS)
        else:
            clients = clients[:-1]
        with open(path, "wb") as handle:
            np.savez(handle, unassigned=drawn.unassigned, moved=np.int64(0),
                     **{f"client_{i}": c for i, c in enumerate(clients)})
    _same(cached_partition(LABELS, spec, 10), drawn)
    _no_drawing(monkeypatch)
    _same(cached_partition(LABELS, spec, 10), drawn)  # the file was written anew


def test_off_and_unwritable_caches_still_give_the_split(tmp_path, monkeypatch):
    spec = _spec("quantity")
    drawn = make_partition(LABELS, spec, 10)
    monkeypatch.setenv(CACHE_ENV, "OFF")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _same(cached_partition(LABELS, spec, 10), drawn)
    assert not any(tmp_path.rglob("*.npz"))
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    monkeypatch.setenv(CACHE_ENV, str(blocker))  # the cache folder cannot be made
    _same(cached_partition(LABELS, spec, 10), drawn)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_relative_cache_folder_is_the_same_for_every_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, "cache")
    assert partition_cache.cache_dir() == tmp_path.resolve() / "cache" / "partitions"


def test_processes_drawing_the_same_split_at_once_all_get_it(cache):
    """A run's workers may miss the cache together; each writes whole files, none sees a torn one."""
    from concurrent.futures import ThreadPoolExecutor

    spec = _spec("dirichlet-equal")
    drawn = make_partition(LABELS, spec, 10)
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: cached_partition(LABELS, spec, 10), range(8)):
            _same(got, drawn)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))


def test_bad_specs_fail_as_before(cache):
    with pytest.raises(PartitionError, match="finite dirichlet alpha"):
        cached_partition(LABELS, PartitionSpec("dirichlet", 5, 0, dirichlet_alpha=0.0), 10)
    with pytest.raises(PartitionError, match="only 600 training samples"):
        cached_partition(LABELS, PartitionSpec("iid", 601, 0), 10)
    assert not any(cache.parent.rglob("*.npz"))


def test_a_process_with_a_warm_cache_never_imports_flwr_datasets(cache):
    """What the cache is for: a Ray worker reading the split the server made skips the ≈2 s import."""
    spec = _spec("dirichlet")
    cached_partition(LABELS, spec, 10)
    script = ("import sys, numpy as np\n"
              "from fedsam.data import PartitionSpec, cached_partition\n"
              "labels = np.random.default_rng(1).permutation(np.arange(600) % 10)\n"
              "part = cached_partition(labels, PartitionSpec('dirichlet', 7, 3, dirichlet_alpha=0.1), 10)\n"
              "print(sum(map(len, part.clients)), 'flwr_datasets' in sys.modules, 'datasets' in sys.modules)\n")
    env_run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert env_run.returncode == 0, env_run.stderr
    assert env_run.stdout.split() == ["600", "False", "False"]
