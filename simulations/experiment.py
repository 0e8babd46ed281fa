"""One experiment, start to finish: check it, then round after round sample, train, aggregate,
evaluate and record. ``fedsam run`` and the ``flwr run`` ServerApp both come here."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsam import wire
from fedsam.runtime import autocast_dtype, eval_batch_size, keep_freed_memory, resolve_device
from fedsam.data import DataError, DeviceBatches, ImageDataset, Partition, PartitionError, cached_partition, load
from fedsam.data import partition_record, summarize, write_partition_json
from fedsam.cohort import batchable
from fedsam.models import build_model, has_batch_norm
from fedsam.optim import FEDGF_RHO, OptimizerSpecError, build
from fedsam.sharpness import Eigenvalue, evaluation_subset, model_sharpness
from fedsam.train import Evaluation, evaluate
from fedsam.worker import optimizer_params
from simulations import checkpoint
from simulations import config as configuration
from simulations.config import ConfigError, ExperimentConfig
from simulations import results
from simulations.results import RunRecorder, holds_a_run
from strategies import (FedAdam, FedAvg, FedAvgM, FedCM, FedDyn, FedGAMMA, FedGF, FedGloSS, FedLESAM, FedLESAMD,
                        FedLESAMS, FedProx, FedSAM, FedSMOO, FedSpeed, MoFedSAM, NodeSetupError, RoundReport, Scaffold)
from strategies.fedgloss import GLOSS_RHO
from strategies.swa import SWA

#: How Ray reports a ClientApp worker process that died (killed, out of host memory, segfault).
WORKER_DEATH = ("ActorDiedError", "RayActorError", "actor died")


def worker_died(reason: str) -> bool:
    return any(mark.lower() in reason.lower() for mark in WORKER_DEATH)


class RunFailed(RuntimeError):
    """The run cannot go on (no client succeeded in a round, ...); the message says why."""


@dataclass
class Checked:
    """A config that passed every check that needs no Ray, with what the checks loaded."""

    cfg: ExperimentConfig
    data: ImageDataset
    partition: Partition


def check(cfg: ExperimentConfig, out: Path | None = None, data: ImageDataset | None = None) -> Checked:
    """Everything that can fail before a cluster starts: names, numbers, data, split, optimizer, device, --out.

    ``data``, if given, must be ``cfg``'s dataset already loaded (a sweep loads it once)."""
    configuration.validate(cfg)
    if out is not None and (found := holds_a_run(out)):
        raise ConfigError(f"--out {out} already holds a run ({found}); choose another folder")
    try:
        resolve_device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    try:
        data = data or load(cfg.dataset, cfg.data_dir, download=cfg.download)
        partition = cached_partition(data.train_labels.numpy(), cfg.partition_spec(), data.num_classes)
    except (DataError, PartitionError) as exc:
        raise ConfigError(str(exc)) from None
    probe = build_model(cfg.model, data.num_classes, cfg.norm)
    lone = [i for i, idx in enumerate(partition.clients) if len(idx) == 1]
    if lone and has_batch_norm(probe):
        raise ConfigError(f"--norm batch cannot train a client that holds one image (client {lone[0]}"
                          f"{f' and {len(lone) - 1} more' if len(lone) > 1 else ''}): use --norm group, or a "
                          "split that leaves no client with one image")
    try:
        message_config = wire.train_config(cfg)  # build the optimizer exactly as a client will
        message_config[wire.SERVER_ROUND] = 1
        options = wire.optimizer_options(message_config, 0)
        build(cfg.optimizer, optimizer_params(probe, cfg.optimizer, options), **options)
    except OptimizerSpecError as exc:
        raise ConfigError(str(exc)) from None
    flower = logging.getLogger("flwr")  # Flower's strategies log their setup; this is only a check
    level = flower.level
    flower.setLevel(logging.ERROR)
    try:
        build_strategy(cfg, [name for name, _ in probe.named_parameters()], None, partition)
    except ValueError as exc:  # the strategy's own checks, for a config from anywhere (flwr run, a sweep)
        raise ConfigError(f"--strategy {cfg.strategy}: {exc}") from None
    finally:
        flower.setLevel(level)
    return Checked(cfg, data, partition)


def trains_batched(cfg: ExperimentConfig) -> bool:
    """Whether a cohort of this run's clients trains as one batched model (``fedsam.cohort``):
    ``--vectorize on``, or ``auto`` on a GPU, for a rule and model that can batch, without relaxed
    initialisation (whose clients start from their own models after round 1, which the batched
    engine does not take: ``fedsam.client_app.train_partitions``)."""
    if cfg.vectorize == "off" or (cfg.vectorize == "auto" and resolve_device(cfg.device).type != "cuda"):
        return False
    if cfg.relaxed_init > 0:
        return False
    return batchable(cfg.optimizer, build_model(cfg.model, 10, cfg.norm)) is None


#: The most bytes of trained models one cohort's reply may carry by default where its clients train one
#: after another; above it, ``auto`` sends one message per client (a worker holds its cohort's models).
COHORT_REPLY_BYTES = 512 * 2**20


def cohort_workers(cfg: ExperimentConfig, available: int | None, batched: bool | None = None) -> int | None:
    """How many cohort messages a round sends, in a simulation (``available`` workers; ``None`` on
    the Deployment Engine, where each node is one client and gets its own message): ``--workers``
    when given; else one per worker where clients train batched (``batched``, computed when
    ``None``); else, on a local CPU with two workers or more, one per worker, its clients trained one
    after another and packed by examples (measured faster than one message per client on 2 cores:
    docs/performance.md), unless a cohort's models would pass ``COHORT_REPLY_BYTES``; else one
    message per client (a GPU's or a cluster's free worker takes the next client)."""
    if available is None:
        return None
    if cfg.workers > 0:
        return cfg.workers
    if trains_batched(cfg) if batched is None else batched:
        return max(1, available)
    if available < 2 or cfg.ray_address or resolve_device(cfg.device).type != "cpu":
        return None
    model = build_model(cfg.model, 10, cfg.norm)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return available if math.ceil(cfg.clients_per_round / available) * model_bytes <= COHORT_REPLY_BYTES else None


def fl_simulator_steps(cfg: ExperimentConfig, partition: Partition) -> float:
    """FL-Simulator's one normaliser for every client, ``K̂ = E·n_0/b`` (client 0's size, no ceiling)."""
    return cfg.local_epochs * len(partition.clients[0]) / cfg.batch_size


def build_strategy(cfg: ExperimentConfig, parameter_keys: list[str], workers: int | None = None,
                   partition: Partition | None = None):
    """The strategy ``cfg.strategy`` names, with the settings it takes (``config``'s ``methods``)."""
    swa = SWA(cfg.swa_start, cfg.swa_cycle, cfg.swa_lr, cfg.swa_collect) if cfg.swa_start else None
    common = dict(seed=cfg.seed, sampling=cfg.client_sampling, lr_decay=cfg.lr_decay, workers=workers, swa=swa)
    clients = (cfg.num_clients, cfg.clients_per_round)
    fixed_steps = None
    if cfg.step_normaliser == "fl-simulator":
        if partition is None:
            raise ValueError("the fl-simulator step normaliser needs the partition (client 0's size)")
        fixed_steps = fl_simulator_steps(cfg, partition)
    name = cfg.strategy
    if name not in ("fedavgm", "fedgf", "fedgloss"):
        common["relaxed_init"] = cfg.relaxed_init
    lesam = dict(rho=cfg.rho, source=cfg.lesam_source.replace("-", "_"))
    if name in configuration.FEDDYN_FAMILY:
        dyn = dict(lam=cfg.dyn_lambda, parameter_keys=parameter_keys, **common)
        if name == "fedlesam-d":
            return FedLESAMD(*clients, **lesam, **dyn)
        return {"feddyn": FedDyn, "fedspeed": FedSpeed, "fedsmoo": FedSMOO}[name](*clients, **dyn)
    common["server_lr"] = cfg.server_lr
    if name in ("fedavg", "fedsam"):
        return (FedAvg if name == "fedavg" else FedSAM)(*clients, **common)
    if name == "fedavgm":
        return FedAvgM(*clients, server_momentum=cfg.server_momentum, **common)
    if name == "fedprox":
        return FedProx(*clients, mu=cfg.prox_mu, prox_clip=cfg.prox_clip, **common)
    if name == "fedadam":
        return FedAdam(*clients, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, tau=cfg.adam_tau, v0=cfg.adam_v0,
                       parameter_keys=parameter_keys, **common)
    if name in ("fedcm", "mofedsam"):
        return (FedCM if name == "fedcm" else MoFedSAM)(
            *clients, alpha=cfg.momentum_alpha, parameter_keys=parameter_keys,
            first_round_alpha=cfg.first_round_alpha, fixed_steps=fixed_steps, **common)
    if name == "fedgf":
        return FedGF(*clients, rho=cfg.rho if cfg.rho is not None else FEDGF_RHO,
                     global_rho=cfg.gf_server_rho or None, threshold=cfg.gf_threshold or None,
                     calibration=cfg.gf_calibration, window=cfg.gf_window, parameter_keys=parameter_keys, **common)
    if name == "fedgloss":
        return FedGloSS(*clients, server_momentum=cfg.gloss_momentum, beta=cfg.gloss_beta, rho=cfg.gloss_server_rho,
                        client_rho=cfg.rho if cfg.rho is not None else GLOSS_RHO, warmup_rounds=cfg.gloss_warmup,
                        rho0=cfg.gloss_rho0, dual=cfg.gloss_dual, parameter_keys=parameter_keys, **common)
    if name == "fedlesam":
        return FedLESAM(*clients, parameter_keys=parameter_keys, **lesam, **common)
    if name == "fedlesam-s":
        return FedLESAMS(*clients, parameter_keys=parameter_keys, fixed_steps=fixed_steps,
                         correction_weight=cfg.lesam_correction, **lesam, **common)
    if name in ("scaffold", "fedgamma"):
        return (Scaffold if name == "scaffold" else FedGAMMA)(*clients, parameter_keys=parameter_keys,
                                                              fixed_steps=fixed_steps, **common)
    raise ValueError(f"unknown strategy {name!r}")


class CentralEvaluator:
    """The global model on the whole test set, on the server's device."""

    def __init__(self, model: torch.nn.Module, data: ImageDataset, device: torch.device, precision: str) -> None:
        keep_freed_memory()  # the server evaluates every round: the same page faults as a training worker's
        self.model = model.to(device)
        self.autocast = autocast_dtype(precision, device)
        self.batches = DeviceBatches(data.test_images.to(device), data.test_labels.to(device), eval_batch_size(device),
                                     mean=data.mean, std=data.std)

    def __call__(self, arrays: ArrayRecord) -> Evaluation:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(self.model, self.batches, autocast_dtype=self.autocast)


class SharpnessProbe:
    """λ_max of the global model's training loss on a fixed, seeded subset of the training set."""

    def __init__(self, model: torch.nn.Module, data: ImageDataset, device: torch.device, size: int, seed: int) -> None:
        self.model = model.to(device)
        idx = evaluation_subset(len(data.train_images), size, seed)
        mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
        self.images = (data.train_images[idx].to(device).float() / 255 - mean) / std
        self.labels = data.train_labels[idx].to(device)
        self.seed = seed

    def __call__(self, arrays: ArrayRecord) -> Eigenvalue:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return model_sharpness(self.model, self.images, self.labels, seed=self.seed)


def title(cfg: ExperimentConfig) -> str:
    split = cfg.partition_spec().describe()
    return f"{cfg.strategy} · {cfg.optimizer} · {cfg.model} · {cfg.dataset} {split} · seed {cfg.seed}"


def write_run_files(checked: Checked, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    configuration.write_json(checked.cfg, out / results.CONFIG)
    labels = checked.data.train_labels.numpy()
    summary = summarize(checked.partition, labels, checked.data.num_classes)
    write_partition_json(out / results.PARTITION, checked.cfg.dataset, checked.partition, summary)


def check_saved_partition(checked: Checked, out: Path) -> None:
    """A resumed run recomputes its split from its settings; a partition.json in ``out`` that says
    otherwise (edited by hand, copied from another run) would describe a split the run does not
    train on, so it is refused rather than ignored or overwritten. ``ConfigError`` in one line."""
    path = out / results.PARTITION
    if not path.exists():
        return
    labels = checked.data.train_labels.numpy()
    wanted = json.loads(json.dumps(partition_record(checked.cfg.dataset, checked.partition,
                                                    summarize(checked.partition, labels, checked.data.num_classes))))
    saved = results.read_object(path)
    if not isinstance(saved, dict):
        why = "it is not a readable JSON object"
    else:
        differs = next((k for k, v in wanted.items() if saved.get(k) != v), None)
        why = differs and f"its {differs!r} differs"
        if differs == "clients" and isinstance(saved["clients"], list):
            why = next((f"client {i}'s samples differ" for i, c in enumerate(wanted["clients"])
                        if i >= len(saved["clients"]) or saved["clients"][i] != c), "it lists more clients")
    if why is not None:
        raise ConfigError(f"{path} does not match the split the run's settings make ({why}); resuming recomputes "
                          f"the split from {results.CONFIG}, so a partition.json edited by hand is refused: "
                          "restore it, or start a new run")


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(a.numpy()).all() for a in arrays.values()
               if np.issubdtype(np.dtype(a.dtype), np.floating))


def _play_round(rnd: int, strategy, grid: Grid, arrays: ArrayRecord, train_config: ConfigRecord,
                cfg: ExperimentConfig) -> tuple[ArrayRecord | None, Any, RoundReport, list[dict[str, Any]]]:
    """Sample, train, aggregate: the new global arrays, the aggregated metrics, the strategy's
    account of the round, and its failures as ``metrics.jsonl`` records them."""
    messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
    replies = list(grid.send_and_receive(messages, timeout=cfg.client_timeout))
    new_arrays, metrics = strategy.aggregate_train(rnd, replies)
    report = strategy.round_report()
    failures = [{"client": pid, "reason": reason} for pid, reason in report.failed]
    failures += [{"client": pid, "reason": f"no reply within {cfg.client_timeout:g} s"} for pid in report.silent]
    return new_arrays, metrics, report, sorted(failures, key=lambda f: f["client"])


def run_experiment(grid: Grid, cfg: ExperimentConfig, out: Path, data: ImageDataset | None = None,
                   echo: bool = True, stop: threading.Event | None = None,
                   resume: dict[str, Any] | None = None, available_workers: int | None = None) -> dict[str, Any]:
    """The federated rounds, from round 1 or from the checkpoint ``resume``.

    ``cfg`` must be resolved and checked. Returns the summary, or ``{"stopped_after": round}``
    when ``stop`` was set (after writing a checkpoint). ``available_workers`` is how many clients a
    simulation can train at once (its Ray workers), for cohort messages (``cohort_workers``);
    ``None``, as under the Deployment Engine, sends one message per client. Raises ``RunFailed`` when too few clients
    succeed or the global model diverges; the last good checkpoint stays in ``out``.
    """
    started = time.monotonic()
    device = resolve_device(cfg.device)
    data = data or load(cfg.dataset, cfg.data_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, cfg.norm)
    arrays = ArrayRecord(model.state_dict())
    batched = trains_batched(cfg)
    workers = cohort_workers(cfg, available_workers, batched)
    packed = workers is not None and not batched  # cohorts of clients trained one after another
    partition = (cached_partition(data.train_labels.numpy(), cfg.partition_spec(), data.num_classes)
                 if packed or cfg.step_normaliser == "fl-simulator" else None)
    strategy = build_strategy(cfg, [name for name, _ in model.named_parameters()], workers, partition)
    if packed:  # packed by examples, so that the cohorts finish together
        strategy.balance_cohorts(partition.sizes())
    evaluator = CentralEvaluator(model, data, device, cfg.precision)
    probe = None
    if cfg.sharpness_every:
        probe = SharpnessProbe(build_model(cfg.model, data.num_classes, cfg.norm), data, device,
                               cfg.sharpness_samples, cfg.seed)
    train_config = wire.train_config(cfg)
    first, earlier_seconds, records, saved_round = 1, 0.0, [], None
    precision = autocast_dtype(cfg.precision, device)  # "auto" settings, as this machine resolves them
    execution = {"device": device.type, "precision": "fp32" if precision is None else str(precision).split(".")[-1],
                 "batched clients": batched}
    if resume is not None:
        before = resume.get("execution")
        if before is not None and before != execution:
            said = lambda e: ", ".join(f"{k} {v}" for k, v in e.items())  # noqa: E731
            print(f"fedsam run: warning: rounds 1-{int(resume['round'])} ran with {said(before)}, this machine "
                  f"resolves the run's settings to {said(execution)}: later rounds are computed differently, so the "
                  "run will not match one never interrupted", file=sys.stderr, flush=True)
        arrays = ArrayRecord(dict(resume["arrays"]))
        strategy.restore_state(resume["strategy"])
        torch.set_rng_state(resume["torch_rng"])
        saved_round = int(resume["round"])
        first = saved_round + 1
        records = list(resume["records"])
        earlier_seconds = float(resume.get("elapsed", 0.0))
    recorder = RunRecorder(out, cfg.rounds, title(cfg), echo=echo, records=records, earlier_seconds=earlier_seconds)

    def fail(rnd: int, why: str) -> RunFailed:
        kept = (f"the last good checkpoint (round {saved_round}) is in {out}; `fedsam run --resume {out}` "
                "continues from it") if saved_round else "no checkpoint was written yet"
        return RunFailed(f"round {rnd}: {why}; {kept}")

    def save(rnd: int, arrays: ArrayRecord, strategy_state: dict[str, Any], rng: torch.Tensor) -> None:
        checkpoint.save(out, {
            "round": rnd, "config": cfg.to_dict(), "arrays": arrays.to_torch_state_dict(),
            "strategy": strategy_state, "records": recorder.records,
            "torch_rng": rng, "elapsed": earlier_seconds + time.monotonic() - started, "execution": execution,
        })

    for rnd in range(first, cfg.rounds + 1):
        round_start = time.monotonic()
        before = strategy.checkpoint_state(), torch.get_rng_state()  # the last good state, if a worker dies
        try:
            new_arrays, metrics, report, failures = _play_round(rnd, strategy, grid, arrays, train_config, cfg)
        except NodeSetupError as exc:
            raise RunFailed(f"round {rnd}, before training: {exc}") from None
        cohort = len(report.sent)
        dead = next((f for f in failures if worker_died(f["reason"])), None)
        if dead is not None:  # Flower's engine never replaces it: every later round would lose its clients
            if rnd > 1 and saved_round != rnd - 1:
                save(rnd - 1, arrays, *before)
            then = (f"`fedsam run --resume {out}` continues after round {rnd - 1} with fresh workers" if rnd > 1
                    else f"`fedsam run --resume {out}` starts it again with fresh workers")
            raise RunFailed(f"round {rnd}: a simulation worker died (client {dead['client']}: "
                            f"{dead['reason'].splitlines()[0][:160]}), and the engine does not replace it; this "
                            f"round was not recorded; {then}")
        succeeded = cohort - len(failures)
        needed = min(cfg.min_successful_clients, cohort)
        if new_arrays is None or succeeded < needed:
            first_failure = f" (client {failures[0]['client']}: {failures[0]['reason']})" if failures else ""
            raise fail(rnd, f"only {succeeded} of {cohort} clients succeeded, fewer than "
                            f"--min-successful-clients {needed}{first_failure}")
        if not _finite(new_arrays):
            raise fail(rnd, "the global model diverged (non-finite weights)")
        arrays = new_arrays
        record: dict[str, Any] = {
            "round": rnd,
            "clients": cohort,
            "failed_clients": len(failures),
            "lr": report.lr,
            "train_loss": float(metrics["train-loss"]),
            "train_accuracy": float(metrics["train-accuracy"]),
            "local_steps": int(metrics["num-steps"]),
            "test_loss": None,
            "test_accuracy": None,
            "test_top5_accuracy": None,
        }
        for name in ("client-drift", "correction-norm", "gf-kappa"):  # the strategy's diagnostics, if any
            if name in metrics:
                record[name.replace("-", "_")] = float(metrics[name])
        evaluated = strategy.evaluation_arrays(arrays)  # the SWA average once SWA has begun
        if cfg.swa_start and rnd >= cfg.swa_start:
            record["swa_models"] = strategy.swa.collected
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            evaluation = evaluator(evaluated)
            record["test_loss"], record["test_accuracy"] = evaluation.loss, evaluation.accuracy
            record["test_top5_accuracy"] = evaluation.top5_accuracy
            if not math.isfinite(record["test_loss"]):
                raise fail(rnd, f"the global model diverged (test loss {record['test_loss']})")
        if probe is not None and (rnd % cfg.sharpness_every == 0 or rnd == cfg.rounds):
            found = probe(evaluated)
            record["sharpness"], record["sharpness_converged"] = found.value, found.converged
        if failures:
            record["failures"] = failures
        record["seconds"] = time.monotonic() - round_start
        recorder.add(record)
        stopping = stop is not None and stop.is_set()
        if rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds or stopping:
            save(rnd, arrays, strategy.checkpoint_state(), torch.get_rng_state())
            saved_round = rnd
        if stopping and rnd < cfg.rounds:
            return {"stopped_after": rnd}

    final = strategy.evaluation_arrays(arrays)
    return recorder.finish(final.to_torch_state_dict(), earlier_seconds + time.monotonic() - started,
                           global_state=arrays.to_torch_state_dict() if final is not arrays else None)
