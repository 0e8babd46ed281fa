"""The split schemes: coverage, determinism, heterogeneity in the expected direction, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedsam.data import PartitionError, PartitionSpec, make_partition, summarize
from tests.helpers import REAL_SUBSET, ROOT, run_cli
from tests.synthetic import write_cifar10

LABELS = np.random.default_rng(0).permutation(np.arange(3000) % 10)  # 300 per class


def _split(scheme, clients=20, seed=0, alpha=0.5, k=2, labels=LABELS):
    spec = PartitionSpec(scheme, clients, seed, dirichlet_alpha=alpha, classes_per_client=k)
    return make_partition(labels, spec, 10)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "dirichlet-equal", "pathological", "quantity"])
@pytest.mark.parametrize("clients", [1, 7, 20, 100])
@pytest.mark.long
def test_every_sample_is_assigned_exactly_once_and_no_client_is_empty(scheme, clients):
    part = _split(scheme, clients=clients, alpha=0.1)
    everything = np.concatenate(part.clients)
    assert len(everything) == len(np.unique(everything))
    assert len(part.clients) == clients and min(len(c) for c in part.clients) >= 1
    if scheme == "pathological":  # the one documented exception: classes no client drew
        drawn = np.unique(LABELS[everything])
        assert np.array_equal(np.sort(part.unassigned), np.flatnonzero(~np.isin(LABELS, drawn)))
        everything = np.concatenate([everything, part.unassigned])
    else:
        assert len(part.unassigned) == 0
    assert sorted(everything.tolist()) == list(range(len(LABELS)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "dirichlet-equal", "pathological", "quantity"])
def test_same_seed_same_split_other_seed_other_split(scheme):
    a, b, c = _split(scheme, seed=4), _split(scheme, seed=4), _split(scheme, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))
    assert any(not np.array_equal(x, y) for x, y in zip(a.clients, c.clients))


def test_iid_and_dirichlet_equal_have_equal_sizes():
    for scheme in ("iid", "dirichlet-equal"):
        sizes = _split(scheme, clients=7).sizes()
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(LABELS)


@pytest.mark.parametrize("scheme,few", [("dirichlet", 4.5), ("dirichlet-equal", 6.5)])
@pytest.mark.long
def test_large_alpha_is_close_to_iid_and_small_alpha_gives_few_classes(scheme, few):
    """Bounds hold for every one of 5 seeds (300 samples per client, 10 classes; 1000 samples per
    class). With equal sizes, a client whose favourite classes run out spills into others, so
    dirichlet-equal keeps more classes per client at the same α."""
    iid = summarize(_split("iid", clients=10), LABELS, 10)
    assert iid["tv_distance_mean"] < 0.1
    for seed in range(5):
        near_iid = summarize(_split(scheme, clients=10, alpha=1000.0, seed=seed), LABELS, 10)
        skewed = summarize(_split(scheme, clients=10, alpha=0.05, seed=seed), LABELS, 10)
        assert near_iid["tv_distance_mean"] < 0.1  # sampling noise of 300 draws is about 0.06
        assert near_iid["classes_per_client_mean"] == 10
        assert skewed["classes_per_client_mean"] < few
        assert skewed["tv_distance_mean"] > 0.5


def test_tv_distance_decreases_with_alpha_on_average_over_seeds():
    def mean_tv(alpha):
        return np.mean([summarize(_split("dirichlet", clients=10, alpha=alpha, seed=s), LABELS, 10)["tv_distance_mean"]
                        for s in range(5)])

    assert mean_tv(0.1) > mean_tv(1.0) > mean_tv(100.0)


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_pathological_gives_exactly_k_classes_per_client(k):
    part = _split("pathological", clients=20, k=k)
    for idx in part.clients:
        assert len(np.unique(LABELS[idx])) == k


def test_pathological_with_too_few_clients_leaves_undrawn_classes_unassigned():
    part = _split("pathological", clients=3, k=1)
    drawn = {int(LABELS[c[0]]) for c in part.clients}
    assert len(drawn) == 3
    assert set(np.unique(LABELS[part.unassigned]).tolist()) == set(range(10)) - drawn
    assert len(np.concatenate(part.clients)) + len(part.unassigned) == len(LABELS)


def test_quantity_skews_sizes_but_not_labels():
    part = _split("quantity", clients=10, alpha=0.3)
    sizes = part.sizes()
    assert sizes.max() > 3 * np.median(sizes)
    big = [c for c in part.clients if len(c) >= 200]
    for idx in big:
        share = np.bincount(LABELS[idx], minlength=10) / len(idx)
        assert 0.5 * np.abs(share - 0.1).sum() < 0.15


def test_clients_that_would_be_empty_get_one_sample_and_it_is_recorded():
    part = _split("dirichlet", clients=200, alpha=0.01)
    assert part.moved_to_empty_clients > 0
    assert min(len(c) for c in part.clients) >= 1
    everything = np.concatenate(part.clients)
    assert sorted(everything.tolist()) == list(range(len(LABELS)))


def test_dirichlet_equal_survives_tiny_alpha():
    """flwr-datasets' InnerDirichletPartitioner fails here with NaN probabilities."""
    part = _split("dirichlet-equal", clients=30, alpha=0.001)
    assert part.sizes().max() - part.sizes().min() <= 1
    assert summarize(part, LABELS, 10)["classes_per_client_mean"] < 4


@pytest.mark.parametrize("spec,message", [
    (PartitionSpec("iid", 3001), "3001 clients"),
    (PartitionSpec("dirichlet", 5, dirichlet_alpha=0.0), "alpha"),
    (PartitionSpec("dirichlet", 5, dirichlet_alpha=-1.0), "alpha"),
    (PartitionSpec("quantity", 5, dirichlet_alpha=float("inf")), "alpha"),
    (PartitionSpec("pathological", 5, classes_per_client=11), "11 classes"),
    (PartitionSpec("pathological", 5, classes_per_client=0), "classes per client"),
    (PartitionSpec("shards", 5), "unknown partition scheme"),
    (PartitionSpec("iid", 0), ">= 1"),
])
def test_infeasible_specs_raise(spec, message):
    with pytest.raises(PartitionError, match=message):
        make_partition(LABELS, spec, 10)


# ----------------------------------------------------------------------------- fedsam partition

def test_cli_writes_json_heatmap_and_prints_summary(cifar10_dir, tmp_path, capsys):
    out = tmp_path / "split"
    code, stdout, stderr = run_cli(["partition", "--data-dir", cifar10_dir, "--num-clients", 8, "--partition",
                                    "dirichlet", "--dirichlet-alpha", 0.2, "--seed", 3, "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "partition.json").read_text())
    assert record["dataset"] == "cifar10" and record["partition"] == "dirichlet"
    assert record["params"] == {"dirichlet_alpha": 0.2} and record["seed"] == 3 and record["num_clients"] == 8
    assert sorted(i for c in record["clients"] for i in c) == list(range(1000))
    assert (out / "label_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for words in ("client size", "min", "median", "max", "classes per client", "TV distance"):
        assert words in stdout


@pytest.mark.parametrize("argv,fragment", [
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--partition", "shards"], "invalid choice: 'shards'"),
    (["--dirichlet-alpha", "0"], "dirichlet-alpha must be > 0"),
    (["--dirichlet-alpha", "-0.5"], "dirichlet-alpha must be > 0"),
    (["--num-clients", "5000"], "5000 clients but only 1000"),
    (["--partition", "pathological", "--classes-per-client", "11"], "only 10 classes"),
    (["--num-clients", "abc"], "invalid int value"),
])
def test_cli_bad_inputs_exit_2_with_one_line(cifar10_dir, tmp_path, capsys, argv, fragment):
    code, _, stderr = run_cli(["partition", "--data-dir", cifar10_dir, "--out", tmp_path / "o", *argv], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and fragment in stderr and "Traceback" not in stderr


def test_cli_missing_and_corrupt_data_dirs(tmp_path, capsys):
    code, _, stderr = run_cli(["partition", "--data-dir", tmp_path / "missing", "--out", tmp_path / "o"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "not found" in stderr
    corrupt = write_cifar10(tmp_path / "corrupt", per_batch=10, test=10)
    (corrupt / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x00" * 64)
    code, _, stderr = run_cli(["partition", "--data-dir", corrupt, "--out", tmp_path / "o"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "corrupt" in stderr


@pytest.mark.long
def test_cli_bad_input_as_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simulations", "partition", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fedsam partition: error:")


@pytest.mark.skipif(not REAL_SUBSET.is_dir(), reason="the shared real CIFAR-10 subset is not here")
def test_real_subset_is_covered_once_and_iid_is_separated_from_dirichlet_0_1(tmp_path, capsys):
    tv = {}
    for scheme, extra in (("iid", []), ("dirichlet", ["--dirichlet-alpha", "0.1"])):
        out = tmp_path / scheme
        code, stdout, _ = run_cli(["partition", "--data-dir", REAL_SUBSET, "--num-clients", 10, "--partition",
                                   scheme, *extra, "--out", out], capsys)
        assert code == 0 and "5170 assigned of 5170" in stdout
        record = json.loads((out / "partition.json").read_text())
        assert sorted(i for c in record["clients"] for i in c) == list(range(5170))
        tv[scheme] = record["summary"]["tv_distance_mean"]
    assert tv["iid"] < 0.1 < 0.4 < tv["dirichlet"]
