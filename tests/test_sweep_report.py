"""``fedsam sweep`` over a 2×2 grid of tiny runs, re-running it, and ``fedsam report`` on the result."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from simulations import config as configuration
from simulations.report import last_tenth_mean, late_trend, rounds_to
from tests.helpers import ROOT, run_cli
from tests.inprocess import run_inprocess

GRID = ["--vary", "dirichlet-alpha=0.5,100", "--vary", "strategy=fedavg,fedsam", "--seeds", "0",
        "--num-clients", "3", "--clients-per-round", "2", "--rounds", "2", "--device", "cpu", "--batch-size", "32",
        "--sharpness-every", "2", "--sharpness-samples", "64"]


def _sweep(cifar10_dir, out, *extra, grid_args=GRID):
    return subprocess.run([sys.executable, "-m", "simulations", "sweep", "--out", str(out), "--data-dir",
                           str(cifar10_dir), *grid_args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def swept(cifar10_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    proc = _sweep(cifar10_dir, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


@pytest.mark.processes
def test_the_cross_product_runs_each_in_its_own_folder(swept):
    out, stdout = swept
    names = sorted(p.name for p in out.iterdir() if (p / "summary.json").is_file())
    assert names == ["dirichlet-alpha=0.5__strategy=fedavg__seed=0", "dirichlet-alpha=0.5__strategy=fedsam__seed=0",
                     "dirichlet-alpha=100.0__strategy=fedavg__seed=0", "dirichlet-alpha=100.0__strategy=fedsam__seed=0"]
    for name in names:
        cfg = json.loads((out / name / "config.json").read_text())
        assert f"dirichlet-alpha={cfg['dirichlet-alpha']}" in name and f"strategy={cfg['strategy']}" in name
    record = json.loads((out / "sweep.json").read_text())
    assert all(entry["status"] == "done" for entry in record["runs"].values())
    assert "[4/4]" in stdout and "ETA" in stdout


@pytest.mark.processes
def test_running_the_sweep_again_skips_finished_runs_and_picks_up_unfinished_ones(swept, cifar10_dir):
    out, _ = swept
    interrupted = out / "dirichlet-alpha=100.0__strategy=fedsam__seed=0"  # checkpointed, then stopped
    (interrupted / "summary.json").unlink()
    kept_metrics = (interrupted / "metrics.jsonl").read_text()
    lost = out / "dirichlet-alpha=0.5__strategy=fedavg__seed=0"  # stopped before any checkpoint
    (lost / "summary.json").unlink()
    (lost / "checkpoint.pt").unlink()
    (lost / "metrics.jsonl").write_text("")
    before = {p.name: (p / "metrics.jsonl").stat().st_mtime_ns for p in out.iterdir() if (p / "summary.json").exists()}
    proc = _sweep(cifar10_dir, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 runs (2 already done, 1 to continue from a checkpoint, 1 to start)" in proc.stdout and "[4/4]" in proc.stdout
    after = {p.name: (p / "metrics.jsonl").stat().st_mtime_ns for p in out.iterdir() if (p / "summary.json").exists()}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert (interrupted / "summary.json").is_file() and (interrupted / "metrics.jsonl").read_text() == kept_metrics
    assert "resuming after round 2" in (out / "logs" / f"{interrupted.name}.log").read_text()
    assert (lost / "summary.json").is_file() and len((lost / "metrics.jsonl").read_text().splitlines()) == 2
    record = json.loads((out / "sweep.json").read_text())
    assert record["runs"][interrupted.name]["resumed"] == "after round 2"


@pytest.mark.processes
@pytest.mark.slow  # two sweeps through Ray (about 80 s); exact resume itself is in CI (test_resilience)
def test_more_rounds_extend_finished_runs_exactly(cifar10_dir, tmp_path):
    """A grid given more --rounds continues each run from its checkpoint; MoFedSAM's momentum is
    state the checkpoint must carry, and the result is the uninterrupted run's."""
    grid = ["--vary", "strategy=mofedsam", "--num-clients", "3", "--clients-per-round", "2", "--device", "cpu",
            "--batch-size", "32"]
    out = tmp_path / "grid"
    run = out / "strategy=mofedsam__seed=0"
    first = _sweep(cifar10_dir, out, *grid, "--rounds", "2", grid_args=[])
    assert first.returncode == 0, first.stdout + first.stderr
    two_rounds = (run / "metrics.jsonl").read_text().splitlines()
    more = _sweep(cifar10_dir, out, *grid, "--rounds", "3", grid_args=[])
    assert more.returncode == 0, more.stdout + more.stderr
    assert "1 run (1 to continue from a checkpoint)" in more.stdout
    extended = (run / "metrics.jsonl").read_text().splitlines()
    assert extended[:2] == two_rounds and len(extended) == 3
    assert json.loads((run / "summary.json").read_text())["rounds"] == 3

    saved = json.loads((run / "config.json").read_text())
    straight = configuration.apply(configuration.ExperimentConfig(), {**saved, "out": str(tmp_path / "straight")},
                                   "test")
    run_inprocess(straight)
    untimed = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in extended]
    reference = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                 for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert untimed == reference
    a, b = torch.load(run / "model.pt"), torch.load(tmp_path / "straight" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)

    fewer = _sweep(cifar10_dir, out, *grid, "--rounds", "2", grid_args=[])
    assert fewer.returncode == 2 and "other settings (--rounds 3 instead of 2)" in fewer.stderr


@pytest.mark.processes
def test_report_table_csv_and_plots(swept, capsys):
    out, _ = swept
    code, stdout, stderr = run_cli(["report", out, "--target", "0.3"], capsys)
    assert code == 0, stderr
    md = (out / "report.md").read_text()
    for label in ("dirichlet-alpha=0.5 strategy=fedavg", "dirichlet-alpha=100.0 strategy=fedsam"):
        assert label in md
    assert "baseline" in md and "rounds to 30%" in md and "still rising (pts)" in md and "![curves.png](curves.png)" in md
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 4
    for row in rows:
        run_dir = out / f"dirichlet-alpha={row['dirichlet-alpha']}__strategy={row['strategy']}__seed=0"
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert float(row["final_mean"]) == pytest.approx(summary["final_test_accuracy"])
        assert float(row["best_mean"]) == pytest.approx(summary["best_test_accuracy"])
        assert float(row["last10_mean"]) == pytest.approx(last_tenth_mean(metrics))
        assert float(row["trend_mean"]) == pytest.approx(metrics[1]["test_accuracy"] - metrics[0]["test_accuracy"])
        assert float(row["sharpness_mean"]) == pytest.approx(summary["final_sharpness"])
        assert row["verdict"] == ("baseline" if row["strategy"] == "fedavg" else "one seed: no verdict")
    for name in ("curves.png", "alpha.png", "sharpness.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.processes
def test_a_failed_run_is_recorded_and_does_not_stop_the_sweep(swept, cifar10_dir, tmp_path, capsys):
    """Reuse the grid's runs, then make one run fail: its data disappears after the sweep's checks."""
    out = tmp_path / "grid"
    shutil.copytree(swept[0], out)
    broken = out / "dirichlet-alpha=0.5__strategy=fedsam__seed=0"
    shutil.rmtree(broken)
    (out / "sweep.json").unlink()
    data = tmp_path / "data"
    shutil.copytree(cifar10_dir, data)
    for run_dir in out.iterdir():  # the finished runs keep matching: point their config at the copy
        if (run_dir / "config.json").is_file():
            cfg = json.loads((run_dir / "config.json").read_text())
            cfg["data-dir"] = str(data)
            (run_dir / "config.json").write_text(json.dumps(cfg))
    # The client ClientApps read the data themselves: a corrupt batch there fails the run, not the checks.
    proc = subprocess.Popen([sys.executable, "-m", "simulations", "sweep", "--out", str(out), "--data-dir", str(data),
                             *GRID], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = proc.stdout.readline()
    assert "4 runs (3 already done, 1 to start)" in first, first
    (data / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"broken")
    rest = proc.stdout.read()
    assert proc.wait(timeout=600) == 1, rest
    assert "FAILED" in rest and "0 failed" not in rest
    record = json.loads((out / "sweep.json").read_text())
    assert record["runs"][broken.name]["status"] == "failed"
    code, stdout, _ = run_cli(["report", out], capsys)
    assert code == 0
    assert "Failed or unfinished runs" in (out / "report.md").read_text() and broken.name in stdout


# Stands in for ``fedsam run``: says it started and whether it leads its own session, then exits
# like a run stopped by Ctrl-C after counting the SIGINTs it got within half a second. A run named
# in FAKE_RUN_FINISHING had ended its last round when the Ctrl-C came: its results are written.
FAKE_RUN = """
import json, os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
config = json.loads(sys.argv[2])
(out / "config.json").write_text(json.dumps(config))
got = []
signal.signal(signal.SIGINT, lambda *_: got.append(1))
(out / "started").write_text(str(os.getsid(0) == os.getpid()))
(out / "pid").write_text(str(os.getpid()))
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
(out / "interrupts").write_text(str(len(got)))
if out.name in os.environ.get("FAKE_RUN_FINISHING", "").split(","):
    (out / "summary.json").write_text(json.dumps({"rounds": config["rounds"], "final_test_accuracy": 0.25}))
sys.exit(130)
"""


@pytest.fixture
def fake_runs(monkeypatch):
    """The sweep starts ``FAKE_RUN`` in place of ``fedsam run``."""
    from simulations import sweep

    monkeypatch.setattr(sweep, "command", lambda cfg, ray_cpus, resume=False:
                        [sys.executable, "-c", FAKE_RUN, cfg.out, json.dumps(cfg.to_dict())])


def test_ctrl_c_stops_the_runs_under_way_once_and_starts_no_more(cifar10_dir, tmp_path, capsys, fake_runs,
                                                                 monkeypatch):
    out = tmp_path / "grid"
    names = [f"strategy={s}__seed=0" for s in ("fedavg", "fedsam", "mofedsam")]
    monkeypatch.setenv("FAKE_RUN_FINISHING", names[1])
    sigint_before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's, when started in the background

    def press_ctrl_c_once_two_runs_started():
        deadline = time.time() + 60
        while time.time() < deadline and not all((out / n / "started").exists() for n in names[:2]):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c_once_two_runs_started, daemon=True).start()
    code, stdout, stderr = run_cli(["sweep", "--out", out, "--data-dir", cifar10_dir, "--vary",
                                    "strategy=fedavg,fedsam,mofedsam", "--parallel", "2", "--rounds", "2"], capsys)
    assert code == 130, stdout + stderr
    assert "finish their round and write a checkpoint" in stderr
    assert "sweep stopped: 1 of 3 runs done, 0 failed; run the same command again" in stdout
    assert "strategy=fedsam seed=0 · final acc 0.2500" in stdout
    for name in names[:2]:  # each got Ctrl-C exactly once, and a terminal's would not reach it
        assert (out / name / "interrupts").read_text() == "1" and (out / name / "started").read_text() == "True"
    assert not (out / names[2]).exists()
    record = json.loads((out / "sweep.json").read_text())
    assert [record["runs"][n]["status"] for n in names] == ["stopped", "done", "pending"]
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_sigterm_ends_the_sweep_and_its_runs(cifar10_dir, tmp_path, capsys, fake_runs):
    run = tmp_path / "grid" / "strategy=fedavg__seed=0"
    sigterm_before = signal.getsignal(signal.SIGTERM)

    def terminate_once_started():
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "pid").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_started, daemon=True).start()
    code, _, stderr = run_cli(["sweep", "--out", tmp_path / "grid", "--data-dir", cifar10_dir, "--vary",
                               "strategy=fedavg", "--rounds", "2"], capsys)
    assert code == 128 + signal.SIGTERM
    assert "sweep ended by SIGTERM: 1 run(s) under way stopped" in stderr
    entry = json.loads((tmp_path / "grid" / "sweep.json").read_text())["runs"]["strategy=fedavg__seed=0"]
    assert entry["status"] == "stopped" and "ended by SIGTERM" in entry["error"]  # never left "running"
    pid = int((run / "pid").read_text())
    try:  # killed by it, not left running in its own session
        assert os.waitpid(pid, 0)[1] == signal.SIGTERM
    except ChildProcessError:  # already reaped: the sweep's Popen polls its child when it is collected
        assert not pathlib.Path(f"/proc/{pid}").exists()
    assert not (run / "interrupts").exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


# Stands in for ``fedsam run``: records its rounds one by one, waiting for the sweep to show each.
SLOW_RUN = """
import json, pathlib, sys, time
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
config = json.loads(sys.argv[2])
(out / "config.json").write_text(json.dumps(config))
seen, label = pathlib.Path(sys.argv[3]), out.name.replace("__", " ")
for r in range(1, config["rounds"] + 1):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": r, "test_accuracy": 0.1 * r}) + "\\n")
    deadline = time.time() + 30
    while time.time() < deadline and f"{label} round {r}/{config['rounds']}" not in seen.read_text():
        time.sleep(0.05)
(out / "summary.json").write_text(json.dumps({"rounds": config["rounds"], "final_test_accuracy": 0.3}))
"""


def test_a_running_sweep_shows_the_round_of_each_run_under_way(cifar10_dir, tmp_path, capsys, monkeypatch):
    from simulations import sweep

    seen = tmp_path / "seen.txt"
    seen.write_text("")
    monkeypatch.setattr(sweep, "PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(sweep, "command", lambda cfg, ray_cpus, resume=False:
                        [sys.executable, "-c", SLOW_RUN, cfg.out, json.dumps(cfg.to_dict()), str(seen)])
    real_print = print

    def tee(*args, **kwargs):  # the fake runs wait until the sweep has shown their round
        real_print(*args, **kwargs)
        with open(seen, "a") as f:
            f.write(" ".join(map(str, args)) + "\n")

    monkeypatch.setattr("builtins.print", tee)
    code, stdout, stderr = run_cli(["sweep", "--out", tmp_path / "grid", "--data-dir", cifar10_dir,
                                    "--vary", "lr=0.1,0.2", "--parallel", "2", "--rounds", "3"], capsys)
    assert code == 0, stdout + stderr
    progress = [line for line in stdout.splitlines() if line.startswith("  under way: ")]
    for lr in ("0.1", "0.2"):
        for r in (1, 2, 3):
            assert any(f"lr={lr} seed=0 round {r}/3" in line for line in progress), progress
    assert "sweep finished: 2 of 2 runs done" in stdout


def test_last_tenth_and_rounds_to_target():
    metrics = [{"round": r, "test_accuracy": a} for r, a in zip(range(1, 21), [0.1 * (i % 10) for i in range(20)])]
    assert last_tenth_mean(metrics) == pytest.approx((0.8 + 0.9) / 2)
    assert last_tenth_mean(metrics, tenths_back=1) == pytest.approx((0.6 + 0.7) / 2)
    assert late_trend(metrics) == pytest.approx(0.2)
    rising = [{"round": r, "test_accuracy": 0.01 * r} for r in range(1, 101)]  # + 0.1 per 10 rounds
    assert late_trend(rising) == pytest.approx(0.1)
    flat = [{"round": r, "test_accuracy": 0.5 + 0.01 * (-1) ** r} for r in range(1, 101)]
    assert late_trend(flat) == pytest.approx(0.0, abs=1e-12)
    assert late_trend(metrics[:1]) is None  # one round: nothing before the last tenth
    assert rounds_to(metrics, 0.5) == 6 and rounds_to(metrics, 0.95) is None


@pytest.mark.parametrize("argv,fragment", [
    (["--vary", "learning-rate=0.1,0.2"], "unknown --vary key 'learning-rate'"),
    (["--vary", "lr="], "empty value list"),
    (["--vary", "lr=0.1,,0.2"], "empty value list"),
    (["--vary", "lr"], "expected KEY=V1,V2"),
    (["--vary", "seed=1,2"], "use --seeds"),
    (["--vary", "lr=0.1", "--vary", "lr=0.2"], "given twice"),
    (["--vary", "rounds=two"], "rounds must be int"),
    (["--vary", "strategy=fedavg,fednova"], "unknown strategy 'fednova'"),
    (["--vary", "lr=0.1", "--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--vary", "lr=0.1", "--parallel", "0"], "--parallel must be >= 1"),
    ([], "at least one --vary"),
])
def test_sweep_bad_inputs(cifar10_dir, tmp_path, capsys, argv, fragment):
    code, _, stderr = run_cli(["sweep", "--out", tmp_path / "s", "--data-dir", cifar10_dir, *argv], capsys)
    assert code == 2 and stderr.count("\n") == 1 and fragment in stderr
    assert not (tmp_path / "s").exists()


def test_report_on_a_folder_without_runs(tmp_path, capsys):
    code, _, stderr = run_cli(["report", tmp_path], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "holds no runs" in stderr
    code, _, stderr = run_cli(["report", tmp_path / "missing"], capsys)
    assert code == 2 and "is not a folder" in stderr


def test_a_corrupt_metrics_line_is_skipped_with_a_warning_not_the_end_of_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"strategy": "fedavg", "optimizer": "sgd", "seed": 0}))
    lines = [json.dumps({"round": r, "test_accuracy": r / 20}) for r in range(1, 21)]
    lines[4] = lines[4][:9]  # round 5: a torn line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"final_test_accuracy": 1.0, "best_test_accuracy": 1.0,
                                                  "wall_seconds": 1.0}))
    code, _, stderr = run_cli(["report", run], capsys)
    assert code == 0
    assert stderr.count("\n") == 1 and f"{run / 'metrics.jsonl'}:5" in stderr and "skipped" in stderr
    record = next(csv.DictReader(open(run / "report.csv")))
    assert float(record["last10_mean"]) == pytest.approx((19 + 20) / 40)  # rounds after the bad line count
    assert float(record["rounds_to_target_mean"]) == 16  # the default target: 80% of the final 1.0


@pytest.mark.processes
def test_a_sweep_with_a_relative_data_dir_finds_its_finished_runs_again(cifar10_dir, tmp_path, monkeypatch):
    """config.json holds the data-dir absolute; the sweep's plan must agree, or its runs look stale."""
    from simulations import sweep
    from simulations.cli import build_parser

    monkeypatch.chdir(cifar10_dir.parent)
    args = build_parser().parse_args(["sweep", "--out", str(tmp_path / "s"), "--data-dir", cifar10_dir.name,
                                      "--vary", "lr=0.1"])
    (planned,) = sweep.plan(args, tmp_path / "s")
    out = tmp_path / "s" / planned.name
    out.mkdir(parents=True)
    configuration.write_json(planned.cfg, out / "config.json")
    (out / "summary.json").write_text("{}")
    assert json.loads((out / "config.json").read_text())["data-dir"] == str(cifar10_dir.resolve())
    assert sweep.state_of(planned) == ("done", "")


def _fake_run(folder, lr, sharpness=None, rounds=10):
    """A finished run's files, written by hand: accuracy climbing to ``10 * lr`` by the last round."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"strategy": "fedsam", "optimizer": "sam", "lr": lr, "seed": 0}))
    lines = [json.dumps({"round": r, "test_accuracy": 10 * lr * r / rounds, "sharpness": sharpness})
             for r in range(1, rounds + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "final_test_accuracy": 10 * lr, "best_test_accuracy": 10 * lr, "wall_seconds": 1.0,
        "final_sharpness": sharpness}))
    return folder


def test_broken_run_files_are_refused_by_name_in_the_report_and_kept_out_of_its_figures(tmp_path, capsys):
    """A broken config.json or summary.json is neither dropped unsaid nor called unfinished; a
    skipped metrics line is named in report.md, not only on stderr."""
    grid = tmp_path / "grid"
    _fake_run(grid / "lr=0.01", 0.01)
    torn = _fake_run(grid / "lr=0.02", 0.02)
    lines = (torn / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:7]
    lines[3] = json.dumps({"test_accuracy": 0.5})  # an object, but no round
    (torn / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (_fake_run(grid / "lr=0.03", 0.03) / "config.json").write_text('{"strategy": "fedsam", ')
    (_fake_run(grid / "lr=0.04", 0.04) / "summary.json").write_text('{"final_test_accuracy": 0.')
    unreadable = _fake_run(grid / "lr=0.05", 0.05)
    (unreadable / "summary.json").unlink()
    (unreadable / "summary.json").mkdir()
    (_fake_run(grid / "lr=0.06", 0.06) / "summary.json").write_text('{"final_test_accuracy": "high"}')

    code, stdout, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    md = (grid / "report.md").read_text()
    assert "6 runs, 2 configurations" in md and "## Refused runs" in md
    refused = md.split("## Refused runs")[1]
    assert f"`lr=0.03`: refused: {grid / 'lr=0.03' / 'config.json'} is not valid JSON" in refused
    assert f"`lr=0.04`: refused: {grid / 'lr=0.04' / 'summary.json'} is not valid JSON" in refused
    assert f"`lr=0.05`: refused: {grid / 'lr=0.05' / 'summary.json'} is unreadable" in refused
    assert f"`lr=0.06`: refused: {grid / 'lr=0.06' / 'summary.json'}: final_test_accuracy is not a finite number" in refused
    assert "## Failed or unfinished runs" not in md  # a broken summary is not an unfinished run
    assert "`lr=0.02/metrics.jsonl` line 3: not a JSON object; the line was skipped" in md
    assert "`lr=0.02/metrics.jsonl` line 4: no integer 'round'; the line was skipped" in md
    assert "4 run(s) refused" in stdout and "lr=0.03" in stdout
    rows = list(csv.DictReader(open(grid / "report.csv")))
    assert [(float(r["lr"]), r["seeds_done"], float(r["final_mean"])) for r in rows] == [
        (0.01, "1", pytest.approx(0.1)), (0.02, "1", pytest.approx(0.2))]


def test_a_report_of_only_broken_runs_says_why_in_one_line(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", 0.01)
    (run / "summary.json").write_text("[1, 2]")
    code, _, stderr = run_cli(["report", run], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert f"holds no readable run: {run / 'summary.json'} holds an array, not a JSON object" in stderr


def test_the_sharpness_plot_has_a_title_and_axis_labels(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    saved = {}
    real_savefig = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved[Path(path).name] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    bars, lines = tmp_path / "bars", tmp_path / "lines"  # one bar per configuration; λ_max against α
    for lr in (0.01, 0.02):
        _fake_run(bars / f"lr={lr}", lr, sharpness=12.5)
    for alpha in (0.1, 1.0):
        folder = _fake_run(lines / f"alpha={alpha}", 0.03, sharpness=3.0 / alpha)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "dirichlet-alpha": alpha}))
    for grid in (bars, lines):
        code, _, stderr = run_cli(["report", grid], capsys)
        assert code == 0, stderr
        (title, xlabel, ylabel), = saved.pop("sharpness.png")
        assert "sharpness" in title and xlabel and "λ_max" in ylabel, (grid.name, title, xlabel, ylabel)


def _diagnosed_run(folder, strategy, seed, top5=None, drift=None, correction=None, rounds=20):
    """``_fake_run`` with the newer per-round keys: ``top5`` the final top-5 accuracy, ``drift`` a
    function of the round, ``correction`` the norm every round (None: the key is not written)."""
    _fake_run(folder, 0.05, rounds=rounds)
    (folder / "config.json").write_text(json.dumps({"strategy": strategy, "optimizer": "sgd", "seed": seed}))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        r = record["round"]
        if top5 is not None:
            record["test_top5_accuracy"] = top5 * r / rounds
        if drift is not None:
            record["client_drift"] = drift(r)
        if correction is not None:
            record["correction_norm"] = correction * r / rounds
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def test_the_table_shows_top5_drift_and_correction_norm_when_runs_recorded_them(tmp_path, capsys):
    """Top-5 and the correction norm at the last round, drift over the last 10% of rounds (here
    rounds 19 and 20), each as mean ± std over seeds; a method without a correction shows —."""
    grid = tmp_path / "grid"
    _diagnosed_run(grid / "fedavg0", "fedavg", 0, top5=0.9, drift=lambda r: 0.5)
    _diagnosed_run(grid / "scaffold0", "scaffold", 0, top5=0.8, drift=lambda r: r / 10, correction=2.0)
    _diagnosed_run(grid / "scaffold1", "scaffold", 1, top5=0.6, drift=lambda r: r / 20, correction=4.0)
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    rows = {r["strategy"]: r for r in csv.DictReader(open(grid / "report.csv"))}
    assert float(rows["scaffold"]["top5_mean"]) == pytest.approx(0.7)
    assert float(rows["scaffold"]["top5_std"]) == pytest.approx(0.1414214)
    assert float(rows["scaffold"]["drift_mean"]) == pytest.approx((1.95 + 0.975) / 2)
    assert float(rows["scaffold"]["correction_mean"]) == pytest.approx(3.0)
    assert float(rows["fedavg"]["drift_mean"]) == pytest.approx(0.5) and rows["fedavg"]["drift_std"] == ""
    assert rows["fedavg"]["correction_mean"] == ""
    md = (grid / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| configuration"))
    assert "| final acc % | final top-5 acc % | last-10% acc % |" in header
    assert "| sharpness λ_max | client drift (last 10%) | correction norm | vs FedAvg+SGD" in header
    scaffold = next(line for line in md.splitlines() if line.startswith("| strategy=scaffold"))
    assert "| 70.00 ± 14.14 |" in scaffold and "| 1.462 ± 0.689 |" in scaffold and "| 3 ± 1.41 |" in scaffold
    fedavg = next(line for line in md.splitlines() if line.startswith("| strategy=fedavg"))
    assert fedavg.split(" | ")[-2] == "—"  # no correction state
    assert "'client drift' is the mean" in md and "![drift.png](drift.png)" in md
    for name in ("drift.png", "correction.png"):
        assert (grid / name).read_bytes()[:4] == b"\x89PNG", name


def test_old_runs_without_the_new_keys_keep_the_table_as_it_was(tmp_path, capsys):
    """Runs from before top-5, drift and the correction norm were recorded (or that recorded them as
    null) get no empty columns and no drift figure."""
    grid = tmp_path / "grid"
    _fake_run(grid / "lr=0.01", 0.01)
    nulls = _fake_run(grid / "lr=0.02", 0.02)
    records = [{**json.loads(line), "test_top5_accuracy": None, "client_drift": None, "correction_norm": None}
               for line in (nulls / "metrics.jsonl").read_text().splitlines()]
    (nulls / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    md = (grid / "report.md").read_text()
    assert "top-5" not in md and "drift" not in md and "correction" not in md
    fields = next(csv.DictReader(open(grid / "report.csv"))).keys()
    assert not any(f.startswith(("top5_", "drift_", "correction_")) for f in fields)
    assert not (grid / "drift.png").exists() and not (grid / "correction.png").exists()


def test_a_mix_of_old_and_new_runs_shows_the_columns_with_a_dash_for_the_old(tmp_path, capsys):
    grid = tmp_path / "grid"
    _fake_run(grid / "old", 0.01)
    _diagnosed_run(grid / "new", "scaffold", 0, top5=0.9, drift=lambda r: 0.2, correction=1.0)
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    rows = {r["strategy"]: r for r in csv.DictReader(open(grid / "report.csv"))}
    assert rows["fedsam"]["top5_mean"] == rows["fedsam"]["drift_mean"] == rows["fedsam"]["correction_mean"] == ""
    assert float(rows["scaffold"]["top5_mean"]) == pytest.approx(0.9)


def test_the_drift_plot_has_labelled_axes_a_title_and_a_log_scale(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    saved = {}
    real_savefig = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved[Path(path).name] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale(),
                                   [line.get_label() for line in ax.get_lines()]) for ax in fig.axes]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    grid = tmp_path / "grid"
    _diagnosed_run(grid / "fedavg", "fedavg", 0, drift=lambda r: 1.0 / r)
    _diagnosed_run(grid / "scaffold", "scaffold", 0, drift=lambda r: 0.0 if r == 3 else 0.1, correction=1.0)
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    (title, xlabel, ylabel, scale, labels), = saved["drift.png"]
    assert "drift" in title and xlabel == "round" and "drift" in ylabel
    assert scale == "linear"  # a zero drift has no place on a log axis
    assert labels == ["strategy=fedavg", "strategy=scaffold"]
    (title, xlabel, ylabel, scale, labels), = saved["correction.png"]
    assert "correction" in title and xlabel == "round" and "norm" in ylabel and scale == "log"
    assert labels == ["strategy=scaffold"]
    assert (grid / "drift.png").read_bytes()[:4] == b"\x89PNG"

    saved.clear()
    positive = tmp_path / "positive"
    _diagnosed_run(positive / "fedavg", "fedavg", 0, drift=lambda r: 1.0 / r)
    code, _, stderr = run_cli(["report", positive], capsys)
    assert code == 0, stderr
    assert saved["drift.png"][0][3] == "log" and "correction.png" not in saved


def _seeded_run(folder, config, seed, final):
    """A finished run with ``config`` (plus its seed) whose final accuracy is ``final``."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config, "seed": seed}))
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_accuracy": final}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"final_test_accuracy": final, "best_test_accuracy": final,
                                                     "wall_seconds": 1.0}))


FEDAVG, FEDSAM = {"strategy": "fedavg", "optimizer": "sgd"}, {"strategy": "fedsam", "optimizer": "sam"}


def _verdicts(grid, capsys):
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    return {(r["strategy"], r.get("server-lr", "")): r for r in csv.DictReader(open(grid / "report.csv"))}


def test_the_verdict_is_a_paired_t_test_over_shared_seeds(tmp_path, capsys):
    """Seeds 0-2 shared: the differences 2.0, 2.2, 1.8 points give mean 2.0 and se 0.1155, so
    t = 17.3 on 2 degrees of freedom (critical 4.303 at 5%): better. Unpaired, the same numbers
    (std 10 points within each configuration) would say nothing."""
    grid = tmp_path / "grid"
    for seed, base in enumerate((0.30, 0.40, 0.50)):
        _seeded_run(grid / f"avg{seed}", FEDAVG, seed, base)
        _seeded_run(grid / f"sam{seed}", FEDSAM, seed, base + (0.020, 0.022, 0.018)[seed])
    row = _verdicts(grid, capsys)[("fedsam", "")]
    assert float(row["delta_vs_fedavg_sgd"]) == pytest.approx(0.02)
    assert float(row["delta_se"]) == pytest.approx(0.002 / 3 ** 0.5)
    assert row["verdict"] == "better"


def test_with_two_seeds_each_a_two_se_gap_is_no_verdict(tmp_path, capsys):
    """Different seeds, so Welch: means 0.50 and 0.46, each with std 0.01414 over 2 seeds, se 0.01414
    and 2 degrees of freedom. The gap is 2.83 se: beyond the old 2-SE rule, inside t(0.975, 2) = 4.30."""
    grid = tmp_path / "grid"
    for seed, final in ((0, 0.49), (1, 0.51)):
        _seeded_run(grid / f"avg{seed}", FEDAVG, seed, final)
    for seed, final in ((2, 0.45), (3, 0.47)):
        _seeded_run(grid / f"sam{seed}", FEDSAM, seed, final)
    row = _verdicts(grid, capsys)[("fedsam", "")]
    assert float(row["delta_vs_fedavg_sgd"]) == pytest.approx(-0.04)
    assert float(row["delta_se"]) == pytest.approx(0.02 / 2 ** 0.5)
    assert row["verdict"] == "no clear difference"


def test_each_method_is_compared_with_the_fedavg_of_its_own_server_lr(tmp_path, capsys):
    """A server-lr grid: FedSAM at 1.0 against FedAvg at 1.0 (+2 points), never against FedAvg at 0.5."""
    grid = tmp_path / "grid"
    for lr, avg, sam in ((0.5, 0.31, 0.30), (1.0, 0.61, 0.63)):
        for seed in (0, 1):
            _seeded_run(grid / f"avg-{lr}-{seed}", {**FEDAVG, "server-lr": lr}, seed, avg + 0.01 * seed)
            _seeded_run(grid / f"sam-{lr}-{seed}", {**FEDSAM, "server-lr": lr}, seed, sam + 0.01 * seed)
    rows = _verdicts(grid, capsys)
    assert float(rows[("fedsam", "1.0")]["delta_vs_fedavg_sgd"]) == pytest.approx(0.02)
    assert float(rows[("fedsam", "0.5")]["delta_vs_fedavg_sgd"]) == pytest.approx(-0.01)


def test_two_fedavg_rows_that_fit_equally_are_named_not_picked(tmp_path, capsys):
    grid = tmp_path / "grid"
    for lr in (0.5, 1.0):
        _seeded_run(grid / f"avg-{lr}", {**FEDAVG, "server-lr": lr}, 0, 0.3)
    _seeded_run(grid / "adam", {"strategy": "fedadam", "optimizer": "sgd", "server-lr": 0.1}, 0, 0.4)
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    adam = next(line for line in (grid / "report.md").read_text().splitlines() if "fedadam" in line)
    assert adam.endswith("— (2 FedAvg+SGD configurations fit equally) |")
    row = next(r for r in csv.DictReader(open(grid / "report.csv")) if r["strategy"] == "fedadam")
    assert row["verdict"] == "2 FedAvg+SGD configurations fit equally"


def test_settings_fedavg_does_not_read_do_not_choose_its_row(tmp_path, capsys):
    """ρ and η mean nothing to FedAvg + SGD: only the server lr decides which FedAvg row fits."""
    grid = tmp_path / "grid"
    _seeded_run(grid / "avg-far", {**FEDAVG, "server-lr": 1.0, "rho": 0.1, "eta": 0.2}, 0, 0.6)
    _seeded_run(grid / "avg-near", {**FEDAVG, "server-lr": 0.5}, 0, 0.3)
    _seeded_run(grid / "sam", {**FEDSAM, "server-lr": 0.5, "rho": 0.1, "eta": 0.2}, 0, 0.35)
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    row = next(r for r in csv.DictReader(open(grid / "report.csv")) if r["strategy"] == "fedsam")
    assert float(row["delta_vs_fedavg_sgd"]) == pytest.approx(0.05)


def test_a_seed_run_twice_makes_the_test_unpaired_over_every_run(tmp_path, capsys):
    """Seed 0 twice (0.9, 0.1) and seed 1 (0.5) against 0.5, 0.5: the difference is the table's
    means' (0.5 − 0.5 = 0), Welch's over all three runs, not a pairing that drops one."""
    grid = tmp_path / "grid"
    _seeded_run(grid / "avg0", FEDAVG, 0, 0.5)
    _seeded_run(grid / "avg1", FEDAVG, 1, 0.49)
    for name, seed, final in (("a", 0, 0.9), ("b", 0, 0.1), ("c", 1, 0.5)):
        _seeded_run(grid / f"sam-{name}", {**FEDSAM, "client-timeout": {"a": 600.0}.get(name, 900.0)}, seed, final)
    row = _verdicts(grid, capsys)[("fedsam", "")]
    assert row["seeds_done"] == "3"
    assert float(row["delta_vs_fedavg_sgd"]) == pytest.approx(0.5 - 0.495)
    assert float(row["delta_se"]) == pytest.approx((0.16 / 3 + 0.00005 / 2) ** 0.5)
    assert row["verdict"] == "no clear difference"


def test_a_non_finite_final_accuracy_refuses_the_run_and_unconverged_sharpness_is_counted(tmp_path, capsys):
    grid = tmp_path / "grid"
    _seeded_run(grid / "nan", FEDSAM, 0, 0.4)
    (grid / "nan" / "summary.json").write_text('{"final_test_accuracy": NaN, "best_test_accuracy": 0.4}')
    _seeded_run(grid / "ok", FEDSAM, 1, 0.4)
    summary = json.loads((grid / "ok" / "summary.json").read_text())
    (grid / "ok" / "summary.json").write_text(json.dumps({**summary, "final_sharpness": 7.5,
                                                          "final_sharpness_converged": False}))
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    md = (grid / "report.md").read_text()
    assert "`nan`: refused:" in md and "final_test_accuracy is not a finite number" in md
    assert "| 7.50 (1 not converged) |" in md
    assert next(csv.DictReader(open(grid / "report.csv")))["sharpness_unconverged"] == "1"


def test_a_setting_a_resume_may_change_splits_no_configuration(tmp_path, capsys):
    grid = tmp_path / "grid"
    _seeded_run(grid / "a", {**FEDSAM, "client-timeout": 600.0, "checkpoint-every": 5}, 0, 0.4)
    _seeded_run(grid / "b", {**FEDSAM, "client-timeout": 900.0, "checkpoint-every": 1}, 1, 0.5)
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    rows = list(csv.DictReader(open(grid / "report.csv")))
    assert len(rows) == 1 and rows[0]["seeds_done"] == "2"


def test_a_summary_without_a_figure_counts_it_as_missing_and_the_target_is_shown_as_given(tmp_path, capsys):
    grid = tmp_path / "grid"
    _seeded_run(grid / "a", FEDSAM, 0, 0.4)
    (grid / "a" / "summary.json").write_text(json.dumps({"final_test_accuracy": 0.4, "best_test_accuracy": 0.4,
                                                         "final_sharpness": float("nan")}))
    code, _, stderr = run_cli(["report", grid, "--target", "0.125"], capsys)
    assert code == 0, stderr
    md = (grid / "report.md").read_text()
    assert "rounds to 12.5%" in md and "nan" not in md
    row = next(csv.DictReader(open(grid / "report.csv")))
    assert row["wall_seconds_mean"] == "" and row["sharpness_mean"] == "" and float(row["target_accuracy"]) == 0.125


def test_a_configuration_that_did_not_measure_sharpness_gets_no_bar(tmp_path, capsys, monkeypatch):
    """No bar at 0 for "not measured": only the configurations with a finite λ_max are drawn."""
    from matplotlib.figure import Figure

    ticks = {}
    real_savefig = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        ticks[Path(path).name] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    grid = tmp_path / "grid"
    _fake_run(grid / "measured", 0.01, sharpness=12.5)
    _fake_run(grid / "unmeasured", 0.02)
    code, _, stderr = run_cli(["report", grid], capsys)
    assert code == 0, stderr
    assert ticks["sharpness.png"] == ["lr=0.01"]


def test_a_partition_needs_no_rounds_so_three_clients_are_fine(cifar10_dir, tmp_path, capsys):
    """clients-per-round (a run's setting, 5 by default) does not refuse a split across 3 clients."""
    code, stdout, stderr = run_cli(["partition", "--data-dir", cifar10_dir, "--num-clients", 3, "--out",
                                    tmp_path / "split"], capsys)
    assert code == 0, stderr
    assert json.loads((tmp_path / "split" / "partition.json").read_text())["num_clients"] == 3


def test_the_eta_counts_the_runs_left_over_the_parallel_slots():
    """Median run 100 s; one run under way for 30 s and four waiting, two slots: (70 + 400) / 2."""
    from simulations.sweep import time_left

    now = time.monotonic()
    assert time_left([], [], [1], 2) is None
    assert time_left([90.0, 100.0, 300.0], [(None, None, now - 30.0, None)], [1, 2, 3, 4], 2) == \
        pytest.approx(235.0, abs=0.5)
