"""Runs that survive: checkpoints and exact resume, Ctrl-C, failing clients, divergence."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsam.client_app import app
from simulations import checkpoint
from simulations import config as configuration
from simulations.experiment import RunFailed
from simulations.run import StopOnInterrupt
from tests.helpers import ROOT, run_cli
from tests.inprocess import InProcessGrid, run_inprocess

BASE = dict(num_clients=4, clients_per_round=3, rounds=4, device="cpu", batch_size=32, checkpoint_every=1)


def _cfg(cifar10_dir, out, **changes):
    values = {"data_dir": str(cifar10_dir), "out": str(out), **BASE, **changes}
    return configuration.apply(configuration.ExperimentConfig(), values, "test").resolved()


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def reference(cifar10_dir, tmp_path_factory):
    """An uninterrupted MoFedSAM run (momentum is strategy state a checkpoint must carry)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_inprocess(_cfg(cifar10_dir, out, strategy="mofedsam"))
    return out


@pytest.fixture(scope="module")
def uninterrupted(cifar10_dir, tmp_path_factory):
    """Uninterrupted runs of the ``KILLED`` cases, which a checkpoint must carry and a resume restore exactly."""
    def run(case):
        out = tmp_path_factory.mktemp(case) / "run"
        changes = KILLED[case]
        run_inprocess(_cfg(cifar10_dir, out, **changes), available_workers=changes.get("workers"))
        return out
    return {case: run(case) for case in KILLED}


#: The run killed with -9 and resumed: the batched engine (cohorts of clients in two fat workers, with
#: MoFedSAM's momentum as strategy state). That each method's own state (SCAFFOLD's c_i, FedDyn's h_i,
#: FedSMOO's duals, ...) travels in the checkpoint is tested in process, where it costs a tenth
#: (test_family_run.py::test_a_run_killed_after_a_checkpoint_resumes_exactly).
KILLED = {"mofedsam-batched": {"strategy": "mofedsam", "vectorize": "on", "workers": 2}}


@pytest.mark.processes
@pytest.mark.parametrize("case", list(KILLED))
def test_kill_9_mid_round_then_resume_gives_the_uninterrupted_run(cifar10_dir, tmp_path, uninterrupted, case):
    reference = uninterrupted[case]
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "simulations", "run", "--data-dir", str(cifar10_dir), "--out", str(out)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in {**BASE, **KILLED[case]}.items()]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # kill as soon as round 2 is checkpointed: round 3 is under way
            if (out / "checkpoint.pt").exists() and checkpoint.load(out)["round"] >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint of round 2 in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint.load(out)["round"]
    assert 2 <= killed_at < 4 and not (out / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "simulations", "run", "--resume", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming after round {killed_at}" in resumed.stdout
    assert _without_timing(_metrics(out)) == _without_timing(_metrics(reference))
    a, b = torch.load(out / "model.pt"), torch.load(reference / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (Ray's raylet and its workers, for a run's driver)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, _, rest = stat.read_text().partition(" (")
            ppid = int(rest.rpartition(") ")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return sorted(out)


@pytest.mark.processes
def test_a_dead_worker_stops_the_run_in_one_line_and_resume_finishes_it_exactly(cifar10_dir, tmp_path, reference):
    """Flower's engine never replaces a Ray worker that died: rather than lose its clients in every
    later round and still say "done", the run stops at once, keeps the last good round, and
    `--resume` finishes it with fresh workers, equal to the uninterrupted run."""
    out = tmp_path / "dead"
    argv = [sys.executable, "-m", "simulations", "run", "--data-dir", str(cifar10_dir), "--strategy", "mofedsam",
            "--out", str(out)] + [f"--{k.replace('_', '-')}={v}" for k, v in BASE.items()]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((out / "checkpoint.pt").exists() and checkpoint.load(out)["round"] >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint of round 1 in time"
        time.sleep(0.05)
    actors = [pid for pid in descendants(proc.pid) if b"ClientAppActor" in _cmdline(pid)]
    assert actors, "no Flower ClientApp worker of this run to kill"
    os.kill(actors[0], signal.SIGKILL)  # this run's own worker, never another run's on the machine
    stdout, stderr = proc.communicate(timeout=300)
    if proc.returncode == 0:  # the kill landed after the last round had trained: nothing to test
        pytest.skip("the run finished before the worker died")
    assert proc.returncode == 1 and "done in" not in stdout
    assert stderr.count("\n") == 1 and "a simulation worker died" in stderr and "--resume" in stderr, stderr
    assert (out / "engine.log").exists()  # Flower's and Ray's tracebacks, for whoever wants them
    kept = checkpoint.load(out)["round"]
    assert len(_metrics(out)) == kept  # the round the worker died in was not recorded
    resumed = subprocess.run([sys.executable, "-m", "simulations", "run", "--resume", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _without_timing(_metrics(out)) == _without_timing(_metrics(reference))
    a, b = torch.load(out / "model.pt"), torch.load(reference / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


class StopDuring(InProcessGrid):
    """Sets the stop event while round ``at`` is being trained, as Ctrl-C would."""

    def __init__(self, *args, event=None, at=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.event, self.at, self.round = event, at, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.round += 1
            if self.round == self.at:
                self.event.set()
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.long
def test_a_stop_request_finishes_the_round_checkpoints_and_resumes_exactly(cifar10_dir, tmp_path, reference):
    import threading

    cfg = _cfg(cifar10_dir, tmp_path / "stopped", strategy="mofedsam", checkpoint_every=10)
    stop = threading.Event()
    result = run_inprocess(cfg, StopDuring(app, cfg.num_clients, event=stop, at=2), stop=stop)
    assert result == {"stopped_after": 2}
    state = checkpoint.load(tmp_path / "stopped")
    assert state["round"] == 2 and state["strategy"]["momentum"] is not None
    run_inprocess(cfg, resume=state)
    assert _without_timing(_metrics(tmp_path / "stopped")) == _without_timing(_metrics(reference))


def test_ctrl_c_sets_the_stop_event_and_a_second_one_interrupts():
    with StopOnInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def test_checkpoints_are_written_atomically_and_read_safely(tmp_path):
    checkpoint.save(tmp_path, {"round": 3, "config": {}, "arrays": {"w": torch.ones(2)}, "strategy": {},
                               "records": [{"round": 1}], "torch_rng": torch.get_rng_state()})
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint from a killed writer")
    assert checkpoint.load(tmp_path)["round"] == 3
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path)
    torch.save({"round": 1, "evil": datetime.timedelta(days=1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(checkpoint.CheckpointError):  # weights_only refuses arbitrary objects
        checkpoint.load(tmp_path)


@pytest.fixture
def faults(monkeypatch):
    def set_faults(fail="", nan=""):
        monkeypatch.setenv("FEDSAM_TEST_FAIL", fail)
        monkeypatch.setenv("FEDSAM_TEST_NAN", nan)
    return set_faults


@pytest.mark.long
def test_a_client_that_raises_is_left_out_and_recorded(cifar10_dir, tmp_path, faults):
    faults(fail="1@2")
    cfg = _cfg(cifar10_dir, tmp_path / "run", clients_per_round=4, optimizer="tests.plugins.faulty:flaky")
    summary = run_inprocess(cfg)
    records = _metrics(tmp_path / "run")
    assert [r["failed_clients"] for r in records] == [0, 1, 0, 0]
    assert records[1]["failures"][0]["client"] == 1 and "out of memory" in records[1]["failures"][0]["reason"]
    assert summary["rounds"] == 4
    assert summary["failed_client_rounds"] == 1  # the summary says what the rounds lost, and why
    assert list(summary["failure_reasons"].values()) == [1] and "out of memory" in next(iter(summary["failure_reasons"]))


@pytest.mark.long
def test_a_client_that_returns_nan_is_left_out_and_recorded(cifar10_dir, tmp_path, faults):
    faults(nan="2")
    cfg = _cfg(cifar10_dir, tmp_path / "run", clients_per_round=4, optimizer="tests.plugins.faulty:flaky")
    run_inprocess(cfg)
    for record in _metrics(tmp_path / "run"):
        assert record["failed_clients"] == 1
        assert record["failures"] == [{"client": 2, "reason": "non-finite values in the returned arrays"}]


class Silent(InProcessGrid):
    """Client 0's replies never arrive, as if it hung past the timeout."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        return [r for r in replies if r.metadata.message_type != "train" or r.metadata.src_node_id != self.node_ids[0]]


@pytest.mark.long
def test_a_client_that_does_not_reply_in_time_counts_as_failed(cifar10_dir, tmp_path):
    cfg = _cfg(cifar10_dir, tmp_path / "run", clients_per_round=4, rounds=2, client_timeout=5.0)
    run_inprocess(cfg, Silent(app, cfg.num_clients))
    for record in _metrics(tmp_path / "run"):
        assert record["failures"] == [{"client": 0, "reason": "no reply within 5 s"}]


@pytest.mark.long
def test_too_few_successful_clients_stop_the_run_and_keep_the_last_good_checkpoint(cifar10_dir, tmp_path, faults):
    faults(fail="0@3,1@3")
    cfg = _cfg(cifar10_dir, tmp_path / "run", clients_per_round=4, min_successful_clients=3,
               optimizer="tests.plugins.faulty:flaky")
    with pytest.raises(RunFailed) as info:
        run_inprocess(cfg)
    message = str(info.value)
    assert "round 3" in message and "only 2 of 4 clients succeeded" in message and "out of memory" in message
    assert "last good checkpoint (round 2)" in message
    assert checkpoint.load(tmp_path / "run")["round"] == 2
    assert len(_metrics(tmp_path / "run")) == 2 and not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.long
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(cifar10_dir, tmp_path):
    cfg = _cfg(cifar10_dir, tmp_path / "run", optimizer="tests.plugins.faulty:explode_in_round_2")
    with pytest.raises(RunFailed, match=r"round 2: the global model diverged.*last good checkpoint \(round 1\)"):
        run_inprocess(cfg)
    assert checkpoint.load(tmp_path / "run")["round"] == 1


@pytest.mark.processes
def test_failing_client_through_ray(cifar10_dir, tmp_path):
    """The same failure through Flower's Simulation Engine: the worker's exception becomes an error reply."""
    out = tmp_path / "ray"
    env = {**os.environ, "FEDSAM_TEST_FAIL": "0@1"}
    proc = subprocess.run([sys.executable, "-m", "simulations", "run", "--data-dir", str(cifar10_dir),
                           "--num-clients", "3", "--clients-per-round", "3", "--rounds", "2", "--device", "cpu",
                           "--optimizer", "tests.plugins.faulty:flaky", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = _metrics(out)
    assert first["failed_clients"] == 1 and first["failures"][0]["client"] == 0
    assert "out of memory" in first["failures"][0]["reason"] and second["failed_clients"] == 0
    assert "1 client(s) failed" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]  # never a bare "done"
    assert last.startswith("warning: 1 client-round(s) failed") and "out of memory" in last


@pytest.mark.long
def test_resume_keeps_the_runs_settings(cifar10_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_inprocess(_cfg(cifar10_dir, out, rounds=2))
    code, _, err = run_cli(["run", "--resume", out, "--lr", "0.5"], capsys)
    assert code == 2 and "--lr cannot change" in err
    code, _, err = run_cli(["run", "--resume", out], capsys)
    assert code == 2 and "is finished (2 of 2 rounds); pass --rounds N to extend it" in err
    code, _, err = run_cli(["run", "--resume", tmp_path / "nothing"], capsys)
    assert code == 2 and "holds no run" in err
    (out / "checkpoint.pt").write_bytes(b"half a checkpoint")
    code, _, err = run_cli(["run", "--resume", out, "--rounds", "3"], capsys)
    assert code == 2 and "is not a readable checkpoint" in err


@pytest.fixture
def inprocess_simulate(monkeypatch):
    """``fedsam run`` with the in-process grid in place of Ray."""
    import simulations.run
    from simulations.experiment import run_experiment

    def simulate(cfg, out, verbose=False, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as run_inprocess: one thread per client, as under Ray
        try:
            return run_experiment(InProcessGrid(app, cfg.num_clients), cfg, out, echo=False, **kwargs)
        finally:
            torch.set_num_threads(threads)

    monkeypatch.setattr(simulations.run, "simulate", simulate)


@pytest.mark.long
def test_a_run_killed_before_its_first_checkpoint_is_redone_by_resume(cifar10_dir, tmp_path, capsys,
                                                                      inprocess_simulate):
    out = tmp_path / "run"
    argv = ["run", "--data-dir", cifar10_dir, "--out", out, "--num-clients", 2, "--clients-per-round", 1,
            "--rounds", 2, "--device", "cpu", "--batch-size", 32]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    reference, model = _metrics(out), torch.load(out / "model.pt")
    # what a kill in round 2 leaves with --checkpoint-every 10: settings and one round, no checkpoint
    for name in ("checkpoint.pt", "summary.json", "model.pt", "accuracy.png"):
        (out / name).unlink()
    (out / "metrics.jsonl").write_text(json.dumps(reference[0]) + "\n")

    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"already holds a run (config.json); continue it with fedsam run --resume {out}" in err
    code, stdout, err = run_cli(["run", "--resume", out], capsys)
    assert code == 0, err
    assert err.count("\n") == 1 and "has no checkpoint yet; starting its run again from round 1" in err
    assert _without_timing(_metrics(out)) == _without_timing(reference)
    again = torch.load(out / "model.pt")
    assert all(torch.equal(again[k], model[k]) for k in model)


def test_config_json_holds_an_absolute_data_dir_so_the_run_works_from_anywhere(cifar10_dir, tmp_path, capsys,
                                                                                 monkeypatch, inprocess_simulate):
    out = tmp_path / "run"
    monkeypatch.chdir(cifar10_dir.parent)
    code, _, err = run_cli(["run", "--data-dir", cifar10_dir.name, "--out", out, "--num-clients", 2,
                            "--clients-per-round", 1, "--rounds", 1, "--device", "cpu"], capsys)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())["data-dir"]
    assert saved == str(cifar10_dir.resolve())
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(["sharpness", out / "model.pt", "--samples", 32, "--iters", 2, "--device", "cpu"],
                                capsys)
    assert code == 0 and "λ_max" in stdout, err


def test_after_a_resume_elapsed_counts_the_whole_run(tmp_path):
    """The progress line's elapsed time goes on from the checkpoint's, while the ETA uses this session's pace."""
    from simulations.results import RunRecorder

    done = [{"round": r, "train_loss": 1.0, "seconds": 1.0} for r in (1, 2)]
    recorder = RunRecorder(tmp_path, rounds=4, title="t", echo=False, records=done, earlier_seconds=3725.0)
    recorder.started -= 10  # round 3 took 10 s in this session
    line = recorder.progress_line({"round": 3, "train_loss": 0.5, "seconds": 10.0})
    assert "elapsed 1:02:15" in line and "ETA 0:10" in line, line


def test_resume_accepts_the_partition_json_it_wrote(cifar10_dir, tmp_path):
    from simulations.experiment import check, check_saved_partition, write_run_files

    cfg = _cfg(cifar10_dir, tmp_path / "run", partition="pathological")
    write_run_files(check(cfg), tmp_path / "run")
    check_saved_partition(check(cfg), tmp_path / "run")
