"""``fedsam bench --quick`` runs and writes well-formed figures (no assertion on speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_cli


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.processes
@pytest.mark.slow  # a benchmark's smoke run (about a minute); CI keeps to the correctness tests
def test_quick_bench_writes_every_part(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "simulations", "bench", "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for heading in ("(a, b) local training", "(c) framework overhead", "(d) data path", "(f) a round's client work"):
        assert heading in proc.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"] and report["quick"] is True
    rows = report["throughput"]
    assert {r["optimizer"] for r in rows} == {"sgd", "sam", "asam", "fgsm-sam"}
    for r in rows:
        assert _positive(r["images_per_s"]) and _positive(r["step_ms"]) and _positive(r["step_time_vs_sgd"])
        assert len(r["runs"]) == report["repeats"]
    assert all(r["step_time_vs_sgd"] == 1.0 for r in rows if r["optimizer"] == "sgd")
    overhead = report["overhead"]
    assert len(overhead["round_seconds_fedsam_run"]) == len(overhead["round_seconds_plain_loop"]) == overhead["rounds"]
    assert _positive(overhead["per_round_overhead_ratio"]) and overhead["startup_seconds"] > 0
    started, round_one = overhead["startup_seconds"], overhead["startup_plus_round_one_seconds"]
    assert 0 < started < round_one < overhead["fedsam_run_wall_seconds"]
    assert overhead["teardown_seconds"] > 0
    assert len(overhead["round_seconds_per_image_loop"]) == overhead["rounds"]
    assert _positive(overhead["fedsam_run_vs_per_image_loop"])
    for r in report["data_path"]:
        assert _positive(r["images_per_s_device_batches"]) and _positive(r["images_per_s_dataloader"])
        assert _positive(r["speedup"])
    cohorts = report["cohorts"]
    assert [(r["model"], r["clients"]) for r in cohorts] == [("cnn", 1), ("cnn", 5)]
    for r in cohorts:  # no CUDA graphs on a CPU: one client at a time against one batched cohort
        assert _positive(r["one_by_one_seconds"]) and _positive(r["batched_seconds"])
        assert r["batched_max_rel_diff"] < 1e-2  # the same training, to float32 rounding


@pytest.mark.processes
def test_bench_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simulations", "bench", "--quick", "--data-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr


def test_bench_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    """Not into the repository root: runs/ is where every other result goes (and is ignored)."""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(["bench", "--quick", "--device", "cpu", "--skip", "a,c,d,e,f"], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "runs" / "bench.json").read_text())
    assert report["quick"] is True and report["skipped"] == ["a", "c", "d", "e", "f"] and report["fedsam"]
    assert "wrote runs/bench.json" in stdout and "a smoke run at tiny sizes" in stdout
    (tmp_path / "a-file").write_text("")
    for out, fragment in (("a-file/bench.json", "a-file is a file, not a folder"), ("runs", "runs is a folder")):
        code, _, stderr = run_cli(["bench", "--quick", "--device", "cpu", "--out", out], capsys)
        assert code == 2 and stderr.count("\n") == 1 and fragment in stderr, stderr
    for flags in (["--repeats", "0"], ["--rounds", "1"]):  # 0 is no "use the default"; 1 round has no later round
        code, _, stderr = run_cli(["bench", "--quick", "--device", "cpu", *flags], capsys)
        assert code == 2 and "--repeats must be >= 1 and --rounds >= 2" in stderr, stderr


def test_the_peers_per_image_loader_augments_like_device_batches():
    """The peer arm of (c) does the same work image by image: the same batch shapes and sizes, the
    same normalisation, a fresh draw every pass."""
    import torch

    from fedsam.data import DeviceBatches
    from simulations.bench import MEAN, STD, PerImage

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (70,), generator=g)
    loader = PerImage.loader(images, labels, 32, seed=3, device=torch.device("cpu"))
    first, second = list(loader), list(loader)
    ours = list(DeviceBatches(images, labels, 32, mean=MEAN, std=STD, augment=True, shuffle=True, seed=3))
    assert [len(y) for _, y in first] == [32, 32, 6] and sum(len(y) for _, y in ours) == 70
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in first)
    assert not torch.equal(first[0][0], second[0][0])  # reshuffled and re-augmented each pass
    theirs, mine = torch.cat([x for x, _ in first]), torch.cat([x for x, _ in ours])
    assert theirs.mean().item() == pytest.approx(mine.mean().item(), abs=0.05)
    assert theirs.std().item() == pytest.approx(mine.std().item(), rel=0.05)


@pytest.mark.parametrize("rounds", [1, 9, 20, 150])
def test_the_bench_reads_the_round_off_a_progress_line(tmp_path, rounds):
    """The bench times round 1 by its progress line; it must read the line a run prints, at any width."""
    from simulations.results import RunRecorder

    recorder = RunRecorder(tmp_path, rounds=rounds, title="t", echo=False)
    for rnd in sorted({1, rounds}):
        line = recorder.progress_line({"round": rnd, "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 0.5,
                                       "seconds": 2.0})
        assert RunRecorder.progress_round(line + "\n") == rnd
    for other in ("fedsam run → runs/x: fedavg with sgd", "done in 3.0 s", "rounds 1/2", "round x/2", ""):
        assert RunRecorder.progress_round(other) is None


def test_a_stopped_bench_keeps_what_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten after every measurement, so a bench stopped by a time limit (a lent
    GPU's call) keeps its finished rows."""
    import argparse

    from simulations import bench, cohort_bench

    def sweep(device, repeats, quick):
        yield {"model": "cnn", "clients": 1}
        raise KeyboardInterrupt  # stopped during the second row

    monkeypatch.setattr(cohort_bench, "cohort_sweep", sweep)
    monkeypatch.setattr(cohort_bench, "describe", lambda row: f"{row['model']} x{row['clients']}")
    out = tmp_path / "bench.json"
    args = argparse.Namespace(device="cpu", quick=True, repeats=1, rounds=1, out=str(out), data_dir=None,
                              skip="a,b,c,d,e")
    with pytest.raises(KeyboardInterrupt):
        bench.run(args)
    report = json.loads(out.read_text())
    assert report["cohorts"] == [{"model": "cnn", "clients": 1}] and report["machine"]["cores"] >= 1
