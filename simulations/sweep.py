"""``fedsam sweep``: the cross product of ``--vary`` values × ``--seeds``, one ``fedsam run`` each.

Each run is its own ``fedsam run`` process writing to ``DIR/<name>/`` (its output goes to
``DIR/logs/<name>.log``), so a run that fails is recorded and the sweep goes on. Running the
sweep again:

- a run already finished with the same settings is skipped;
- an unfinished one continues from its last checkpoint (``fedsam run --resume``), or starts again
  from scratch when it has none;
- a finished one whose only difference is a larger ``--rounds`` is extended from its checkpoint,
  so a grid that has not flattened yet can be given more rounds without redoing the first ones.

``DIR/sweep.json`` records every run's settings and status. While runs are under way, a line
every 10 s or so (when a round has ended) gives each one's round, ``round x/y``; a line per
finished run gives its outcome.

Ctrl-C stops a sweep the way it stops a run: the runs under way finish their round, write a
checkpoint and exit (a second Ctrl-C stops them at once), nothing new starts, and running the same
command again continues them. SIGTERM ends the sweep and its runs at once; they continue from
their last periodic checkpoint.

How many runs at once (``--parallel auto``): enough that each run still gets a core per client
of a round, ``cores // (clients-per-round × num-cpus-per-client)``, or on a GPU run
``GPUs // (clients-per-round × num-gpus-per-client)``; at least one. Each run's Ray instance is
then limited to its share of the cores (``--ray-num-cpus``). With ``--ray-address`` every run
attaches to that cluster and Ray shares its resources among them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsam.runtime import usable_cpus
from simulations import checkpoint
from simulations import config as configuration
from simulations.errors import UsageError
from simulations.config import (RESUMABLE, ConfigError, ExperimentConfig, comparable, first_difference, rounds_fixed,
                                run_command)
from simulations.experiment import check
from simulations.presets import PRESETS
from simulations import results
from simulations.results import duration

NOT_VARIABLE = ("out", "seed")
PROGRESS_EVERY = 10.0  # seconds between two lines on the runs under way (when a round has ended)
STOPPED = (130, -signal.SIGINT)  # a run's exit after Ctrl-C: with a fresh checkpoint, or at once


@dataclass
class PlannedRun:
    name: str
    params: dict[str, Any]  # the --vary values of this run, in --vary order
    seed: int
    cfg: ExperimentConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sweep", help="run a grid of simulations over values and seeds",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a fedsam run flag without its dashes and the values to try (repeatable)")
    parser.add_argument("--seeds", default="0", metavar="N,N,...", help="comma-separated seeds (default: 0)")
    parser.add_argument("--seed", default=argparse.SUPPRESS, metavar="N",
                        help="not for a sweep: give its seeds with --seeds (refused, never read as --seeds)")
    parser.add_argument("--parallel", default="auto", metavar="N|auto",
                        help="runs at once: a number, or auto (default)")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="start every run from a preset")
    parser.add_argument("--config", metavar="FILE.toml", help="settings file shared by every run")
    configuration.add_flags(parser, exclude=("seed",))
    parser.set_defaults(handler=run)


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    known = {configuration.key(name) for name in ExperimentConfig.field_names()}
    varied: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("_", "-")
        if not sep:
            raise UsageError(f"--vary {item!r}: expected KEY=V1,V2,...")
        if key not in known or key in NOT_VARIABLE:
            hint = "use --seeds for seeds" if key == "seed" else "a fedsam run flag name without '--', e.g. dirichlet-alpha"
            raise UsageError(f"unknown --vary key {key!r} ({hint})")
        if key in varied:
            raise UsageError(f"--vary {key} is given twice")
        parts = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in parts):
            raise UsageError(f"--vary {key}: empty value list")
        field = key.replace("-", "_")
        try:
            varied[key] = [configuration.coerce(field, v, f"--vary {key}") for v in parts]
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        same = next((v for i, v in enumerate(varied[key]) if v in varied[key][:i]), None)
        if same is not None:
            raise UsageError(f"--vary {key}: two values mean the same setting ({same!r}); each run needs its own")
    if not varied:
        raise UsageError("give at least one --vary KEY=V1,V2,...")
    return varied


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def run_name(params: dict[str, Any], seed: int) -> str:
    parts = [f"{k}={v}" for k, v in params.items()] + [f"seed={seed}"]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts))


def plan(args: argparse.Namespace, sweep_dir: Path) -> list[PlannedRun]:
    if "seed" in vars(args):  # one seed flag per sweep: --seed never silently loses to --seeds
        raise UsageError(f"--seed {args.seed}: a sweep takes its seeds from --seeds (e.g. --seeds {args.seed})")
    if args.config and "seed" in configuration.read_toml(args.config):
        raise UsageError(f"config file {args.config} sets seed, which --seeds would override; "
                         "give a sweep's seeds with --seeds only")
    varied = parse_vary(args.vary)
    seeds = parse_seeds(args.seeds)
    base = configuration.flags_given(args)
    base.pop("out", None)
    runs = []
    for values in itertools.product(*varied.values()):
        params = dict(zip(varied, values))
        for seed in seeds:
            name = run_name(params, seed)
            if any(run.name == name for run in runs):
                other = next(run for run in runs if run.name == name)
                raise UsageError(f"--vary: {other.params} and {params} would share the folder {name}; "
                                 "give values that differ in letters, digits or . _ = + -")
            flags = {**base, **{k.replace("-", "_"): v for k, v in params.items()}, "seed": seed,
                     "out": str(sweep_dir / name)}
            cfg = configuration.resolve(flags, preset=args.preset, config_file=args.config).resolved()
            runs.append(PlannedRun(name, params, seed, cfg))
    return runs


def check_all(runs: list[PlannedRun]) -> None:
    """Every run's settings checked before the first starts; the dataset is read once per folder."""
    loaded: dict[tuple[str, str], Any] = {}
    for planned in runs:
        cfg = planned.cfg
        where = (cfg.dataset, cfg.data_dir)
        try:
            if where not in loaded:
                loaded[where] = check(cfg).data
            else:
                check(cfg, data=loaded[where])
        except ConfigError as exc:
            raise UsageError(f"run {planned.name}: {exc}") from None


def state_of(planned: PlannedRun) -> tuple[str, str]:
    """What to do with a run's folder, and why: ``done`` (finished, same settings), ``resume`` (a
    checkpoint to continue or extend), ``restart`` (unfinished, no usable checkpoint), ``new``, or
    ``stale`` (other settings: the second item names one)."""
    out = Path(planned.cfg.out)
    saved = results.read_config(out)
    if saved is None:
        return ("restart", "") if out.exists() else ("new", "")
    wanted = planned.cfg.to_dict()
    mine, theirs = comparable(wanted), comparable(saved)
    if (key := first_difference(mine, theirs)) is not None:
        return "stale", f"--{key} {theirs.get(key)} instead of {mine.get(key)}"
    finished = results.is_finished(out)
    if saved.get("rounds") == wanted["rounds"] and finished:
        return "done", ""
    try:
        reached = int(checkpoint.load(out)["round"])
    except checkpoint.CheckpointError:
        reached = None
    if saved.get("rounds", 0) > wanted["rounds"]:  # a checkpoint is never past its config's rounds
        return "stale", f"--rounds {saved.get('rounds')} instead of {wanted['rounds']}"
    if saved.get("rounds") != wanted["rounds"] and (why := rounds_fixed(saved)):
        return "stale", f"--rounds {saved.get('rounds')} instead of {wanted['rounds']} ({why})"
    if reached is None:
        return "restart", ""
    return "resume", f"after round {reached}"


def auto_parallel(runs: list[PlannedRun]) -> int:
    """How many runs fit side by side: the hungriest run's clients of a round on the cores this
    process may use (or on the GPUs), whatever order the runs come in."""
    from simulations.run import gpus_per_client

    def fits(cfg: ExperimentConfig) -> int:
        gpus = gpus_per_client(cfg)
        if gpus > 0:
            import torch

            return max(1, math.floor(torch.cuda.device_count() / (cfg.clients_per_round * gpus)))
        return max(1, usable_cpus() // math.ceil(cfg.clients_per_round * cfg.num_cpus_per_client))

    return min(fits(run.cfg) for run in runs)


def command(cfg: ExperimentConfig, ray_cpus: int, resume: bool = False) -> list[str]:
    """The ``fedsam run`` argv: every setting, or with ``resume`` only those a resumed run may change
    (it keeps its own config.json for the rest)."""
    values = dataclasses.asdict(dataclasses.replace(cfg, ray_num_cpus=ray_cpus))
    if resume:
        values = {"resume": cfg.out, **{name: values[name] for name in RESUMABLE},
                  "optimizer": cfg.optimizer}  # the sweep chose the spec: that confirms a plug-in
    return run_command(values)


def start_run(cfg: ExperimentConfig, ray_cpus: int, log: Any, resume: bool = False) -> subprocess.Popen:
    """One ``fedsam run`` in its own process, output to ``log``. It gets its own session, so a
    terminal's Ctrl-C reaches only the sweep, which passes it on once (see ``ForwardSignals``)."""
    return subprocess.Popen(command(cfg, ray_cpus, resume), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


class ForwardSignals:
    """The runs have their own sessions, so the sweep passes signals on. Ctrl-C: each run under way
    finishes its round and checkpoints, and nothing new starts; a second Ctrl-C stops them at once.
    SIGTERM, or SIGHUP from a closed terminal: the runs get it too and the sweep exits."""

    def __init__(self, running: Any, ended: Any = None) -> None:
        self.running = running  # called on each signal: the processes to pass it to
        self.ended = ended  # called with the signal before SIGTERM or SIGHUP ends the sweep
        self.interrupts = 0
        self.previous: dict[int, Any] = {}

    def _pass_on(self, signum: int) -> None:
        for proc in self.running():
            if proc.poll() is None:
                proc.send_signal(signum)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            sys.stderr.write("\nstopping: the runs under way finish their round and write a checkpoint "
                             "(Ctrl-C again to stop them at once)\n")
        self._pass_on(signum)

    def _end(self, signum: int, frame: Any) -> None:
        self._pass_on(signum)
        if self.ended is not None:
            self.ended(signum)
        raise SystemExit(128 + signum)

    def __enter__(self) -> "ForwardSignals":
        if threading.current_thread() is threading.main_thread():
            for signum, handler in ((signal.SIGINT, self._interrupt), (signal.SIGTERM, self._end),
                                    (signal.SIGHUP, self._end)):
                self.previous[signum] = signal.signal(signum, handler)
        return self

    @property
    def stopping(self) -> bool:
        return self.interrupts > 0

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def time_left(run_seconds: list[float], active: list[tuple], queue: list, parallel: int) -> float | None:
    """What the runs still to do should take: each the median time of the runs that finished
    normally, less what the runs under way have already spent, shared over ``parallel`` slots;
    ``None`` until a run has finished normally."""
    if not run_seconds:
        return None
    typical = statistics.median(run_seconds)
    now = time.monotonic()
    under_way = sum(max(typical - (now - started), 0.0) for _, _, started, _ in active)
    return (under_way + typical * len(queue)) / parallel


def run_label(planned: PlannedRun) -> str:
    return " ".join(f"{k}={v}" for k, v in planned.params.items()) + f" seed={planned.seed}"


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    for line in reversed(lines):
        if "error" in line.lower() or "stopped" in line.lower():
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "out", None):
        raise UsageError("--out is required: the folder for the sweep")
    sweep_dir = Path(args.out)
    try:
        runs = plan(args, sweep_dir)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    check_all(runs)
    found = {r.name: state_of(r) for r in runs}
    states = {name: state for name, (state, _) in found.items()}
    stale = [name for name, state in states.items() if state == "stale"]
    if stale:
        raise UsageError(f"{sweep_dir / stale[0]} holds a run with other settings ({found[stale[0]][1]}); "
                         "use another --out")
    if args.parallel == "auto":
        parallel = auto_parallel(runs)
    else:
        try:
            parallel = int(args.parallel)
        except ValueError:
            raise UsageError(f"--parallel must be a number or auto, got {args.parallel!r}") from None
        if parallel < 1:
            raise UsageError(f"--parallel must be >= 1, got {parallel}")
    attached = bool(runs[0].cfg.ray_address)  # a running cluster brings its own resources
    ray_cpus = max(1, usable_cpus() // parallel) if parallel > 1 and not attached else 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "logs").mkdir(exist_ok=True)
    record = {"vary": parse_vary(args.vary), "seeds": parse_seeds(args.seeds), "parallel": parallel, "runs": {}}
    for planned in runs:
        record["runs"][planned.name] = {"params": planned.params, "seed": planned.seed,
                                        "status": "done" if states[planned.name] == "done" else "pending"}
        if states[planned.name] == "resume":
            record["runs"][planned.name]["resumed"] = found[planned.name][1]
    _write_record(sweep_dir / "sweep.json", record)

    todo = [r for r in runs if states[r.name] != "done"]
    skipped = len(runs) - len(todo)
    resumed = sum(state == "resume" for state in states.values())
    counts = [(skipped, "already done"), (resumed, "to continue from a checkpoint"), (len(todo) - resumed, "to start")]
    print(f"fedsam sweep → {sweep_dir}: {len(runs)} run{'s' * (len(runs) != 1)} ("
          + ", ".join(f"{n} {what}" for n, what in counts if n) + f"), {parallel} at a time", flush=True)
    started = time.monotonic()
    active: list[tuple[PlannedRun, subprocess.Popen, float, Any]] = []
    finished = 0
    queue = list(todo)
    shown: dict[str, int] = {}
    shown_at = 0.0
    run_seconds: list[float] = []  # how long the runs that finished normally took

    def ended(signum: int) -> None:
        """SIGTERM or SIGHUP: the runs under way end at once; sweep.json says so before the sweep exits."""
        for planned, *_ in active:
            record["runs"][planned.name].update(
                status="stopped", error=f"the sweep was ended by {signal.Signals(signum).name}; running it "
                                        "again continues this run from its last checkpoint")
        _write_record(sweep_dir / "sweep.json", record)
        print(f"sweep ended by {signal.Signals(signum).name}: {len(active)} run(s) under way stopped; "
              "run the same command again to continue", file=sys.stderr, flush=True)

    with ForwardSignals(lambda: [proc for _, proc, _, _ in active], ended) as interrupt:
        while (queue and not interrupt.stopping) or active:
            while queue and len(active) < parallel and not interrupt.stopping:
                planned = queue.pop(0)
                out = Path(planned.cfg.out)
                resume = states[planned.name] == "resume"
                if out.exists() and not resume:
                    shutil.rmtree(out)  # unfinished and nothing to continue from: start again
                log = open(sweep_dir / "logs" / f"{planned.name}.log", "a" if resume else "w")
                proc = start_run(planned.cfg, ray_cpus, log, resume)
                active.append((planned, proc, time.monotonic(), log))
                record["runs"][planned.name]["status"] = "running"
                _write_record(sweep_dir / "sweep.json", record)
            time.sleep(0.5)
            now = {p.name: results.rounds_recorded(Path(p.cfg.out)) for p, *_ in active}
            if now != shown and any(now.values()) and time.monotonic() - shown_at >= PROGRESS_EVERY:
                shown, shown_at = now, time.monotonic()  # the runs under way, not only the finished ones
                print("  under way: " + " · ".join(f"{run_label(p)} round {now[p.name]}/{p.cfg.rounds}"
                                                    for p, *_ in active), flush=True)
            for item in list(active):
                planned, proc, t0, log = item
                if proc.poll() is None:
                    continue
                active.remove(item)
                log.close()
                finished += 1
                entry = record["runs"][planned.name]
                entry["seconds"] = time.monotonic() - t0
                entry["returncode"] = proc.returncode
                label = run_label(planned)
                # the folder decides: a Ctrl-C that comes as a run ends its last round finds it done
                if (proc.returncode == 0 or proc.returncode in STOPPED) and state_of(planned)[0] == "done":
                    entry["status"] = "done"
                    summary = results.read_summary(Path(planned.cfg.out)) or {}
                    outcome = f"final acc {summary['final_test_accuracy']:.4f}"
                elif proc.returncode in STOPPED:
                    entry["status"] = "stopped"
                    entry["error"] = "stopped; running the sweep again continues it from its checkpoint"
                    outcome = "stopped"
                else:
                    entry["status"] = "failed"
                    entry["error"] = (f"killed by {signal.Signals(-proc.returncode).name} from outside the sweep; "
                                      "running the sweep again continues it from its last checkpoint"
                                      if proc.returncode < 0 else _last_error(sweep_dir / "logs" / f"{planned.name}.log"))
                    outcome = f"FAILED (exit {proc.returncode}): {entry['error']}"
                _write_record(sweep_dir / "sweep.json", record)
                elapsed = time.monotonic() - started
                if entry["status"] == "done":
                    run_seconds.append(entry["seconds"])
                left = None if interrupt.stopping else time_left(run_seconds, active, queue, parallel)
                eta = "" if left is None else f" ETA {duration(left)}"
                print(f"[{skipped + finished:>{len(str(len(runs)))}}/{len(runs)}] {label} · {outcome} · "
                      f"{duration(entry['seconds'])} · sweep elapsed {duration(elapsed)}{eta}", flush=True)
    statuses = [entry["status"] for entry in record["runs"].values()]
    done, failed = statuses.count("done"), statuses.count("failed")
    if interrupt.stopping or "stopped" in statuses:
        print(f"sweep stopped: {done} of {len(runs)} runs done, {failed} failed; "
              f"run the same command again to continue")
        return 130 if interrupt.stopping else 1
    print(f"sweep finished: {done} of {len(runs)} runs done, {failed} failed; now: fedsam report {sweep_dir}")
    return 1 if failed else 0
