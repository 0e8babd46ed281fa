"""``fedsam run`` end to end on Ray, its files, its determinism, and its bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fedsam.client_app import app
from fedsam.models import build_model
from simulations import config as configuration
from simulations.experiment import check, run_experiment, write_run_files
from tests.helpers import ROOT, run_cli
from tests.inprocess import InProcessGrid

TINY = ["--num-clients", "3", "--clients-per-round", "2", "--rounds", "2", "--strategy", "mofedsam",
        "--device", "cpu", "--batch-size", "32", "--seed", "4"]
TIMING = ("seconds",)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def ray_run(cifar10_dir, tmp_path_factory):
    """One real `fedsam run`: Flower's Simulation Engine on Ray, 3 clients, 2 rounds, CPU."""
    out = tmp_path_factory.mktemp("ray") / "run"
    proc = subprocess.run([sys.executable, "-m", "simulations", "run", "--data-dir", str(cifar10_dir), *TINY,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


@pytest.mark.processes
def test_run_writes_every_file_and_sane_metrics(ray_run):
    out, stdout = ray_run
    for name in ("config.json", "partition.json", "metrics.jsonl", "summary.json", "model.pt", "accuracy.png"):
        assert (out / name).is_file(), name
    records = _metrics(out)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_loss"] > 0 and r["train_loss"] > 0
        assert r["seconds"] > 0 and r["clients"] == 2 and r["failed_clients"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
    assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in records)
    assert summary["wall_seconds"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["strategy"] == "mofedsam" and cfg["optimizer"] == "sam" and cfg["rho"] == 0.1
    model = build_model("cnn", 10)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "round 1/2" in stdout and "round 2/2" in stdout and "ETA" in stdout and "final test accuracy" in stdout


@pytest.mark.processes
def test_same_seed_same_metrics_and_model_with_or_without_ray(ray_run, cifar10_dir, tmp_path):
    """The in-process loop with one thread per client is the Ray run, bit for bit: sampling,
    partition, local training and aggregation depend on the seed alone."""
    out, _ = ray_run
    cfg = configuration.apply(configuration.ExperimentConfig(),
                              json.loads((out / "config.json").read_text()), "config.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what Ray gives an actor with --num-cpus-per-client 1
    try:
        for attempt in range(2):
            again = tmp_path / f"again{attempt}"
            checked = check(cfg, again)
            write_run_files(checked, again)
            run_experiment(InProcessGrid(app, cfg.num_clients, id_seed=attempt), cfg, again, data=checked.data,
                           echo=False)
            assert _without_timing(_metrics(again)) == _without_timing(_metrics(out))
            a, b = torch.load(out / "model.pt"), torch.load(again / "model.pt")
            assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.processes
@pytest.mark.slow
def test_two_ray_runs_with_the_same_seed_write_the_same_metrics(ray_run, cifar10_dir, tmp_path):
    out, _ = ray_run
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "simulations", "run", "--data-dir", str(cifar10_dir), *TINY,
                           "--out", str(again)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _without_timing(_metrics(again)) == _without_timing(_metrics(out))


@pytest.fixture
def no_simulation(monkeypatch):
    """Bad input must be rejected before any simulation (and so before Ray) starts."""
    import simulations.run

    def forbidden(*args, **kwargs):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(simulations.run, "simulate", forbidden)


@pytest.mark.parametrize("argv,fragment", [
    (["--strategy", "fednova"], "invalid choice: 'fednova'"),
    (["--model", "vit"], "invalid choice: 'vit'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--optimizer", "adamw-sam"], "unknown optimizer 'adamw-sam'"),
    (["--optimizer", "no_such_pkg.mod:make"], "cannot import module 'no_such_pkg.mod'"),
    (["--clients-per-round", "5", "--num-clients", "3"], "clients-per-round (5) is above num-clients (3)"),
    (["--rounds", "0"], "rounds must be >= 1"),
    (["--rounds", "-3"], "rounds must be >= 1"),
    (["--lr", "0"], "lr must be > 0"),
    (["--batch-size", "0"], "batch-size must be >= 1"),
    (["--rho", "-1", "--optimizer", "sam"], "rho must be >= 0"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
])
def test_bad_input_exits_2_with_one_line_before_ray(cifar10_dir, tmp_path, capsys, no_simulation, argv, fragment):
    code, _, stderr = run_cli(["run", "--data-dir", cifar10_dir, "--out", tmp_path / "o", *argv], capsys)
    assert code == 2 and stderr.count("\n") == 1 and fragment in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


def test_missing_data_dir_and_missing_out(tmp_path, capsys, no_simulation):
    code, _, stderr = run_cli(["run", "--data-dir", tmp_path / "none", "--out", tmp_path / "o"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "CIFAR-10 not found" in stderr
    code, _, stderr = run_cli(["run", "--data-dir", tmp_path / "none"], capsys)
    assert code == 2 and "--out is required" in stderr


def test_an_out_folder_that_holds_a_run_is_left_alone(cifar10_dir, tmp_path, capsys, no_simulation):
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text('{"precious": true}\n')
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    code, _, stderr = run_cli(["run", "--data-dir", cifar10_dir, "--out", out], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "already holds a run" in stderr
    assert (out / "config.json").read_text() == '{"precious": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]


def test_cuda_asked_for_without_a_gpu(cifar10_dir, tmp_path, capsys, no_simulation):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, stderr = run_cli(["run", "--data-dir", cifar10_dir, "--device", "cuda", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no CUDA device" in stderr


@pytest.mark.long
def test_help_lists_the_documented_flags():
    proc = subprocess.run([sys.executable, "-m", "simulations", "run", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    for flag in ("--dataset", "--data-dir", "--model", "--strategy", "--optimizer", "--rho", "--momentum-alpha",
                 "--partition", "--dirichlet-alpha", "--classes-per-client", "--num-clients", "--clients-per-round",
                 "--rounds", "--local-epochs", "--batch-size", "--lr", "--lr-decay", "--weight-decay", "--momentum",
                 "--server-lr", "--seed", "--device", "--out", "--eval-every", "--preset", "--config",
                 "--num-cpus-per-client", "--num-gpus-per-client"):
        assert flag in proc.stdout, flag
