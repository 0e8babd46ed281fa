"""A catalogue of bad invocations: each exits 2 with one line on stderr, no traceback, no Ray
cluster, and leaves an existing run folder exactly as it was."""

from __future__ import annotations

import hashlib

import pytest

from tests.helpers import run_cli
from tests.synthetic import write_cifar10, write_cifar100


@pytest.fixture
def world(tmp_path, cifar10_dir, monkeypatch):
    """Data, a corrupt copy, config files, a finished run, a run with a broken checkpoint and a plain file."""
    import simulations.run
    import simulations.sweep

    def no_simulation(*args, **kwargs):
        raise AssertionError("a simulation started")

    monkeypatch.setattr(simulations.run, "simulate", no_simulation)
    monkeypatch.setattr(simulations.sweep, "start_run", no_simulation)

    corrupt = write_cifar10(tmp_path / "corrupt", per_batch=10, test=10)
    (corrupt / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    finished = tmp_path / "finished"
    finished.mkdir()
    for name, text in (("config.json", '{"strategy": "fedsam"}\n'), ("metrics.jsonl", '{"round": 1}\n'),
                       ("summary.json", '{"final_test_accuracy": 0.5}\n'), ("checkpoint.pt", "precious")):
        (finished / name).write_text(text)
    unresumable = tmp_path / "unresumable"
    unresumable.mkdir()
    (unresumable / "config.json").write_text('{"dataset": "cifar10"}\n')
    (unresumable / "checkpoint.pt").write_bytes(b"half a checkpoint")
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "garbage.toml").write_bytes(b"\xff\xfe\x00 = = =")
    (tmp_path / "unknown.toml").write_text('rounds = 3\nlearning_rate = 0.1\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "seeded.toml").write_text("seed = 3\n")
    cifar100 = write_cifar100(tmp_path / "c100", train=100, test=100)
    return {"data": str(cifar10_dir), "corrupt": str(corrupt), "finished": str(finished),
            "unresumable": str(unresumable), "tmp": str(tmp_path), "cifar100": str(cifar100),
            "edited": str(_run_with_an_edited_partition(tmp_path / "edited", cifar10_dir))}


def _run_with_an_edited_partition(out, data_dir):
    """A run stopped after round 1 whose partition.json was then edited: one sample moved between clients."""
    import json

    import torch

    from simulations import checkpoint, config
    from simulations.experiment import check, write_run_files

    cfg = config.resolve({"data_dir": str(data_dir), "out": str(out), "rounds": 3}).resolved()
    write_run_files(check(cfg), out)
    record = json.loads((out / "partition.json").read_text())
    record["clients"][1].append(record["clients"][0].pop())
    (out / "partition.json").write_text(json.dumps(record) + "\n")
    checkpoint.save(out, {"round": 1, "config": cfg.to_dict(), "arrays": {}, "strategy": {}, "records": [],
                          "torch_rng": torch.get_rng_state(), "elapsed": 1.0})
    return out


CASES = [
    # fedsam run: unknown names
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedfoo"], "invalid choice: 'fedfoo'"),
    # a method's option given to another method, a client that makes it another named method
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "scaffold", "--momentum-alpha", "0.5"],
     "--strategy scaffold does not take momentum-alpha (it is fedcm, mofedsam's)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "feddyn", "--server-lr", "0.5"],
     "--strategy feddyn does not take server-lr"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedavg", "--prox-mu", "0.5"],
     "--strategy fedavg does not take prox-mu"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "scaffold", "--optimizer", "sam"],
     "scaffold with a SAM client (sam) is fedgamma: use --strategy fedgamma"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedspeed", "--optimizer", "sgd"],
     "fedspeed with an SGD client is feddyn"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedsmoo", "--optimizer", "sam"],
     "fedsmoo's clients use only dual-sam (got --optimizer sam)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedavg", "--optimizer", "lesam"],
     "lesam is the client optimizer of fedlesam, fedlesam-s, fedlesam-d, not of fedavg"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedlesam", "--lesam-correction", "0.1"],
     "--strategy fedlesam does not take lesam-correction (it is fedlesam-s's)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "feddyn", "--dyn-lambda", "-0.1"],
     "dyn-lambda must be >= 0"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedprox", "--prox-mu", "-1"],
     "prox-mu must be >= 0"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedcm", "--momentum-alpha", "1.5"],
     "momentum-alpha must be in (0, 1]"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedadam", "--adam-beta2", "1"],
     "adam-beta2 must be in [0, 1)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedgloss", "--gloss-beta", "0"],
     "gloss-beta must be > 0"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--optimizer", "ssam-d", "--ssam-sparsity", "1.5"],
     "ssam-sparsity must be in [0, 1]"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--rounds", "10", "--swa-start", "11"],
     "swa-start 11 is after the last round (10)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--swa-start", "5", "--swa-cycle", "0"],
     "swa-cycle must be >= 1"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedavg", "--relaxed-init", "-0.1"],
     "relaxed-init must be >= 0"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--strategy", "fedavgm", "--relaxed-init", "0.1"],
     "--strategy fedavgm does not take relaxed-init"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--model", "resnet18", "--norm", "batch", "--num-clients",
      "1000", "--partition", "iid"], "--norm batch cannot train a client that holds one image (client 0 and 999 more)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--swa-start", "1", "--swa-collect", "last"],
     "invalid choice: 'last'"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--optimizer", "lookahead"], "unknown optimizer 'lookahead'"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--model", "vgg11"], "invalid choice: 'vgg11'"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--partition", "shards"], "invalid choice: 'shards'"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--preset", "fedsam-paper"], "invalid choice"),
    # zero, negative, out of range
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--clients-per-round", "11"], "above num-clients (10)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--rounds", "0"], "rounds must be >= 1"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--lr", "-0.1"], "lr must be > 0"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--batch-size", "0"], "batch-size must be >= 1"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--num-clients", "0"], "num-clients must be >= 1"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--dirichlet-alpha", "0"], "dirichlet-alpha must be > 0"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--eval-every", "-2"], "eval-every must be >= 1"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--checkpoint-every", "0"], "checkpoint-every must be >= 1"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--min-successful-clients", "6"], "above clients-per-round"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--num-clients", "5000"], "5000 clients but only 1000"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--rounds", "1.5"], "invalid int value"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--seed", "-1"], "seed must be >= 0, got -1"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--seed", str(2 ** 63)], "seed must be below 2**63"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--seed", "1" + "0" * 30], "seed must be below 2**63"),
    # missing or corrupt data
    (["run", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/o"], "CIFAR-10 not found"),
    (["run", "--data-dir", "{corrupt}", "--out", "{tmp}/o"], "corrupt CIFAR-10 file"),
    (["run", "--data-dir", "{cifar100}", "--out", "{tmp}/o"],
     "holds CIFAR-100 ({cifar100}/cifar-100-python), not CIFAR-10; pass --dataset cifar100"),
    (["run", "--data-dir", "{cifar100}/cifar-100-python", "--out", "{tmp}/o"], "holds CIFAR-100"),
    (["run", "--dataset", "cifar100", "--data-dir", "{data}", "--out", "{tmp}/o"], "holds CIFAR-10 ("),
    # config files
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--config", "{tmp}/garbage.toml"], "not readable TOML"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--config", "{tmp}/unknown.toml"],
     "unknown setting 'learning_rate'"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/o", "--config", "{tmp}/none.toml"], "does not exist"),
    # resume and --out
    (["run", "--resume", "{unresumable}"], "is not a readable checkpoint"),
    (["run", "--resume", "{tmp}/empty"], "holds no run"),
    (["run", "--data-dir", "{data}", "--out", "{finished}"], "already holds a run (config.json); continue it with "
                                                             "fedsam run --resume {finished}"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/a-file"], "a-file is a file, not a folder"),
    (["run", "--data-dir", "{data}", "--out", "{tmp}/a-file/run"], "a-file is a file, not a folder"),
    (["run", "--resume", "{finished}", "--strategy", "fedavg"], "--strategy cannot change"),
    (["run", "--resume", "{edited}"], "partition.json does not match the split the run's settings make "
                                      "(client 0's samples differ)"),
    # fedsam partition
    (["partition", "--data-dir", "{data}", "--out", "{tmp}/p", "--partition", "pathological",
      "--classes-per-client", "12"], "only 10 classes"),
    (["partition", "--data-dir", "{data}", "--out", "{tmp}/p", "--dirichlet-alpha", "-1"], "dirichlet-alpha must be > 0"),
    (["partition", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/p"], "not found"),
    # fedsam sweep
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "alpha=0.1,1"], "unknown --vary key 'alpha'"),
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "lr="], "empty value list"),
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "lr=0.1", "--seeds", "0,x"], "--seeds"),
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "rounds=0,1"], "rounds must be >= 1"),
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "lr=0.1", "--seeds", f"0,{2 ** 64}"],
     "seed must be below 2**63"),
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "lr=0.1", "--seed", "3"],
     "--seed 3: a sweep takes its seeds from --seeds"),
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "lr=0.1", "--seeds", "1", "--seed", "3"],
     "--seed 3: a sweep takes its seeds from --seeds"),
    (["sweep", "--data-dir", "{data}", "--out", "{tmp}/s", "--vary", "lr=0.1", "--config", "{tmp}/seeded.toml"],
     "sets seed, which --seeds would override"),
    # fedsam report
    (["report", "{tmp}/empty"], "holds no runs"),
    (["report", "{tmp}/missing"], "is not a folder"),
    (["sweep", "--out", "{tmp}/s", "--data-dir", "{data}", "--vary", "lr=0.001,1e-3"],
     "--vary lr: two values mean the same setting (0.001)"),
    (["partition", "--data-dir", "{data}", "--out", "/proc/fedsam-split"], "--out /proc/fedsam-split:"),
]


def _snapshot(folder):
    from pathlib import Path

    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("argv,fragment", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.long
def test_bad_invocation(world, capsys, argv, fragment):
    import ray

    before = _snapshot(world["finished"])
    code, _, stderr = run_cli([a.format(**world) for a in argv], capsys)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"fedsam {argv[0]}: error:"), stderr
    assert fragment.format(**world) in stderr and "Traceback" not in stderr
    assert not ray.is_initialized()
    assert _snapshot(world["finished"]) == before


def test_the_catalogue_is_large():
    assert len(CASES) >= 20
    assert {c[0][0] for c in CASES} == {"run", "partition", "sweep", "report"}
