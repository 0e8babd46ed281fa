"""``fedsam run``: one federated simulation on Flower's Simulation Engine (Ray backend).

Everything that can be wrong with the request is checked before Ray starts; then the ServerApp
(this process, one thread) and the ClientApps (Ray actors, ``--num-cpus-per-client`` and
``--num-gpus-per-client`` each) run the experiment, and the results land in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from fedsam.optim import BUILTIN
from simulations import checkpoint
from simulations import config as configuration
from simulations.errors import UsageError
from simulations.config import RESUMABLE, ConfigError, ExperimentConfig, comparable, first_difference, rounds_fixed
from simulations.experiment import RunFailed, check, check_saved_partition, run_experiment, write_run_files
from simulations.presets import PRESETS
from simulations.ray_cluster import check_reachable
from simulations import results
from simulations.results import holds_a_run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run a federated simulation", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), help="start from a named setting (flags override it)")
    parser.add_argument("--config", metavar="FILE.toml", help="settings file: flag names as keys (flags override it)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint "
                        "(with its own settings; --rounds extends it, resource flags may change); a run "
                        "stopped before its first checkpoint starts again from round 1")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    configuration.add_flags(parser)
    parser.set_defaults(handler=run)


def resolve_args(args: argparse.Namespace) -> ExperimentConfig:
    cfg = configuration.resolve(configuration.flags_given(args), preset=args.preset, config_file=args.config)
    if not cfg.out:
        raise ConfigError("--out is required: the folder for this run's results")
    return cfg.resolved()


def resume_args(args: argparse.Namespace) -> tuple[ExperimentConfig, dict[str, Any] | None]:
    """The run's own config (plus the flags that may change on resume) and its checkpoint, or None
    when the run stopped before writing one: then it can only be redone, with the same settings."""
    out = Path(args.resume)
    flags = configuration.flags_given(args)
    confirmed = flags.pop("optimizer", None)  # restating a plug-in spec confirms it (below)
    fixed = sorted(set(flags) - set(RESUMABLE) - {"out"})
    if fixed or args.preset or args.config:
        what = fixed[0].replace("_", "-") if fixed else ("preset" if args.preset else "config")
        raise ConfigError(f"--resume continues a run with its own settings; --{what} cannot change")
    if flags.get("out") not in (None, str(out)):
        raise ConfigError("--resume DIR writes to DIR; leave out --out")
    saved = results.read_config(out)
    if saved is None:
        raise ConfigError(f"{out} holds no run (no readable {results.CONFIG})")
    spec = saved.get("optimizer")
    if confirmed is not None and confirmed != spec:
        raise ConfigError(f"--resume continues a run with its own settings; --optimizer cannot change ({spec!r})")
    if spec is not None and spec not in BUILTIN and confirmed != spec:  # a folder from elsewhere runs no code unasked
        raise ConfigError(f"{out}/{results.CONFIG} names the plug-in optimizer {spec!r}, which resuming imports and "
                          f"calls; if you trust it, confirm with --optimizer '{spec}'")
    cfg = configuration.apply(ExperimentConfig(), {**saved, **flags, "out": str(out)}, f"{out}/{results.CONFIG}")
    if not (out / results.CHECKPOINT).exists():
        return cfg, None
    try:
        state = checkpoint.load(out)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    done = int(state["round"])
    kept, written = comparable(state["config"]), comparable(saved)
    if (name := first_difference(kept, written)) is not None:
        raise ConfigError(f"{out}/{results.CONFIG} says --{name} {written.get(name)} but its checkpoint ran with "
                          f"{kept.get(name)}: the run's files disagree")
    if cfg.rounds < done:
        raise ConfigError(f"the checkpoint is at round {done}, past --rounds {cfg.rounds}")
    if cfg.rounds == done and results.is_finished(out):
        raise ConfigError(f"{out} is finished ({done} of {done} rounds); pass --rounds N to extend it")
    if cfg.rounds != saved.get("rounds") and (why := rounds_fixed(saved)):
        raise ConfigError(f"--rounds cannot change for this run: {why}")
    last = state["records"][-1] if state["records"] else {}
    if cfg.rounds == done and last.get("test_accuracy") is None:
        raise ConfigError(f"--rounds {done} would end the run at its checkpoint, whose round was not evaluated "
                          f"(--eval-every {cfg.eval_every}); give more rounds")
    return cfg, state


def gpus_per_client(cfg: ExperimentConfig) -> float:
    """``-1`` means: none on a CPU-only run; on a GPU a whole one per worker when cohorts train
    batched (one fat worker per GPU), else a quarter (four clients share one)."""
    if cfg.num_gpus_per_client >= 0:
        return cfg.num_gpus_per_client
    from fedsam.runtime import resolve_device

    if resolve_device(cfg.device).type == "cpu":
        return 0.0
    from simulations.experiment import trains_batched

    return 1.0 if trains_batched(cfg) else 0.25


def ray_workers(cfg: ExperimentConfig) -> int:
    """How many ClientApp actors Ray can run at once with these resources: this machine's cores and
    GPUs for a local Ray, the cluster's once it is up for ``--ray-address``."""
    import torch

    from fedsam.runtime import usable_cpus

    cpus, gpus = float(cfg.ray_num_cpus or usable_cpus()), float(torch.cuda.device_count())
    if cfg.ray_address:  # the ServerApp starts beside Flower's ray.init: wait for it, then ask the cluster
        import time

        import ray

        deadline = time.monotonic() + 120
        while not ray.is_initialized() and time.monotonic() < deadline:
            time.sleep(0.1)
        if ray.is_initialized():
            total = ray.cluster_resources()
            cpus, gpus = total.get("CPU", cpus), total.get("GPU", 0.0)
    by_cpu = int(cpus // cfg.num_cpus_per_client)
    share = gpus_per_client(cfg)
    return max(1, min(by_cpu, int(gpus // share)) if share > 0 else by_cpu)


def backend_config(cfg: ExperimentConfig, verbose: bool) -> dict[str, Any]:
    """Flower's backend config: client resources, and ``ray.init`` arguments (Flower's init args)."""
    init_args: dict[str, Any] = {"log_to_driver": verbose}
    if not verbose:
        init_args["logging_level"] = logging.ERROR
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address  # the cluster brings its own resources
    else:
        init_args["include_dashboard"] = False
        if cfg.ray_num_cpus:
            init_args["num_cpus"] = cfg.ray_num_cpus
    return {
        "client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": gpus_per_client(cfg)},
        "init_args": init_args,
    }


ENGINE_LOG = "engine.log"


def quiet_flower(verbose: bool, out: Path) -> logging.Handler | None:
    """Flower logs every message at INFO and a worker's death as a wall of tracebacks; our own
    progress lines and one-line failures say what a user needs. Without ``--verbose`` Flower's
    warnings and errors go to ``engine.log`` in the run folder instead of the terminal; the
    handler returned is the caller's to remove."""
    if verbose:
        return None
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL + 1)
    file_handler = logging.FileHandler(out / ENGINE_LOG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    return file_handler


class StopOnInterrupt:
    """First Ctrl-C: finish the round, write a checkpoint, stop. Second Ctrl-C: stop now."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.previous = None

    def __enter__(self) -> threading.Event:
        def handler(signum: int, frame: Any) -> None:
            if self.event.is_set():
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.event.set()
            sys.stderr.write("\nstopping after this round, with a checkpoint (Ctrl-C again to stop at once)\n")

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, handler)
        return self.event

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def simulate(cfg: ExperimentConfig, out: Path, verbose: bool = False, **experiment_kwargs: Any) -> dict[str, Any]:
    """Run the experiment on the Simulation Engine; returns the summary."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedsam.client_app import app as client_app

    engine_log = quiet_flower(verbose, out)
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
    summary: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Any) -> None:
        summary.update(run_experiment(grid, cfg, out, echo=True, available_workers=ray_workers(cfg),
                                      **experiment_kwargs))

    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients,
                       backend_config=backend_config(cfg, verbose), verbose_logging=verbose)
    finally:
        if engine_log is not None:
            logging.getLogger("flwr").removeHandler(engine_log)
            engine_log.close()
    return summary


def fresh_out(out: Path) -> None:
    """A new run needs a folder without one; say how to go on with the run that is there."""
    if found := holds_a_run(out):
        raise ConfigError(f"--out {out} already holds a run ({found}); continue it with "
                          f"fedsam run --resume {out}, or choose another folder")


def run(args: argparse.Namespace) -> int:
    state = None
    try:
        if args.resume:
            cfg, state = resume_args(args)
            checked = check(cfg)
            check_saved_partition(checked, Path(cfg.out))
        else:
            cfg = resolve_args(args)
            fresh_out(Path(cfg.out))
            checked = check(cfg, Path(cfg.out))
        if cfg.ray_address:
            cfg = dataclasses.replace(cfg, ray_address=check_reachable(cfg.ray_address))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    out = Path(cfg.out)
    if state is None:
        if args.resume:
            sys.stderr.write(f"fedsam run: {out} has no checkpoint yet; starting its run again from round 1 "
                             "with its saved settings\n")
        write_run_files(checked, out)
    else:
        configuration.write_json(cfg, out / results.CONFIG)  # --rounds or resources may have changed
    (out / results.SUMMARY).unlink(missing_ok=True)
    print(f"fedsam run → {out}: {cfg.strategy} with {cfg.optimizer} on {cfg.model}, {cfg.dataset} "
          f"{cfg.partition_spec().describe()}, {cfg.num_clients} clients ({cfg.clients_per_round} per round), "
          f"{cfg.rounds} rounds, seed {cfg.seed}"
          + (f"; resuming after round {state['round']}" if state else ""), flush=True)
    try:
        with StopOnInterrupt() as stop:
            summary = simulate(cfg, out, args.verbose, data=checked.data, stop=stop, resume=state)
    except RunFailed as exc:
        sys.stderr.write(f"fedsam run: the run stopped at {exc}\n")
        return 1
    if "stopped_after" in summary:
        print(f"stopped after round {summary['stopped_after']}, checkpoint written; continue with: "
              f"fedsam run --resume {out}")
        return 130
    if not summary:
        sys.stderr.write("fedsam run: the simulation ended without finishing its rounds (see --verbose)\n")
        return 1
    print(f"done in {summary['wall_seconds']:.1f} s · final test accuracy {summary['final_test_accuracy']:.4f} · "
          f"best {summary['best_test_accuracy']:.4f} (round {summary['best_round']})")
    print(f"results in {out}/: {results.LISTING}")
    if summary["failed_client_rounds"]:  # never a bare "done" over rounds that lost clients
        reason, count = next(iter(summary["failure_reasons"].items()))
        print(f"warning: {summary['failed_client_rounds']} client-round(s) failed and were left out of their "
              f"rounds' averages; most often ({count}x): {reason}")
    return 0
