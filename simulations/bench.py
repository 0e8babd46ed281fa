"""``fedsam bench``: how fast local training and whole simulations run on this machine.

(a) local-training throughput (images/s) and peak memory for sgd, sam, asam and fgsm-sam
    (steps=2), for ``cnn`` and ``resnet18`` at the presets' batch sizes;
(b) each optimizer's step time relative to SGD's (SAM's floor is two passes: 2x);
(c) framework overhead: a complete ``fedsam run`` (Flower + Ray) against exactly the same client
    work (same data, seeds, steps) in a plain in-process loop, with start-up reported apart from
    the per-round ratio, and against the peer's design (FL-Simulator's: one process, clients one
    after another, a ``DataLoader`` augmenting image by image);
(d) our data path (``DeviceBatches``) against the usual Flower quickstart path (a torch
    ``DataLoader`` over a Hugging Face dataset whose ``with_transform`` decodes and transforms
    each image) on the same training;
(e) on a GPU: rounds of the FL-Simulator MoFedSAM setting (ResNet-18-GN, 10 clients x 5 epochs
    x 500 images, batch 50) through ``fedsam run``, with batched cohorts on and off;
(f) batched cohorts against one client at a time, each eager and as CUDA graphs, for cohorts of
    1, 5, 10 and 100 CNN clients and 1 and 10 ResNet-18-GN clients, plus, on a GPU, the
    FL-Simulator round's client work and an SSAM-F round's (``simulations.cohort_bench``, which
    runs without Flower too).

Every figure is the median of ``--repeats`` runs after a warm-up. The table goes to stdout, the
figures and a description of the machine to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsam.runtime import autocast_dtype, resolve_device
from fedsam.data import DeviceBatches, load
from fedsam.models import build_model
from fedsam.optim import build
from fedsam.train import train_locally
from simulations import cohort_bench, results
from simulations.config import file_in_the_way, run_command
from simulations.errors import UsageError

OPTIMIZERS = {"sgd": {}, "sam": {}, "asam": {}, "fgsm-sam": {"steps": 2}}  # the factories' own defaults, FGSM at 2 steps
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure training speed and framework overhead", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in well under a minute")
    parser.add_argument("--data-dir", help="real CIFAR-10 to use (default: random images of the same shape)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, help="measured runs per figure (default: 5, quick: 2)")
    parser.add_argument("--rounds", type=int, help="rounds of the overhead comparison (default: 20, quick: 2)")
    parser.add_argument("--skip", default="", help="parts to leave out, e.g. c,e")
    parser.add_argument("--out", default="runs/bench.json", metavar="FILE.json",
                        help="JSON file for the figures, its folder created (default: runs/bench.json)")
    parser.set_defaults(handler=run)


# ----------------------------------------------------------------------------- helpers

def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import flwr

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__, "flwr": flwr.__version__, "device": device.type,
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def fedsam_version() -> str:
    """The package version and, in a git checkout, the commit (with ``+dirty`` for local changes):
    a bench's JSON says what code it measured."""
    from fedsam import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+dirty"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} ({commit})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def images_for(n: int, data_dir: str | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir:
        data = load("cifar10", data_dir)
        return data.train_images[:n].to(device), data.train_labels[:n].to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return images.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def timed_training(model: torch.nn.Module, spec: str, batches_for, epochs: int, device: torch.device,
                   repeats: int, autocast) -> tuple[list[float], int, float | None]:
    """Seconds of each measured run (after one warm-up), steps per run, peak memory (MiB)."""
    times, steps, peak = [], 0, None
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(repeats + 1):
        model.load_state_dict(start_state)
        optimizer = build(spec, model.named_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, **OPTIMIZERS[spec])
        batches = batches_for(i)
        _sync(device)
        if i == 1:
            _reset_peak(device)
        start = time.perf_counter()
        result = train_locally(model, optimizer, batches, epochs, autocast_dtype=autocast)
        _sync(device)
        if i > 0:  # the first run warms up kernels, allocators and caches
            times.append(time.perf_counter() - start)
        steps = result.num_steps
    peak = _peak_mib(device)
    return times, steps, peak


# ----------------------------------------------------------------------------- (a) and (b)

def throughput(device: torch.device, quick: bool, repeats: int, data_dir: str | None) -> list[dict[str, Any]]:
    autocast = autocast_dtype("auto", device)
    on_gpu = device.type == "cuda"
    settings = [("cnn", 32, "quickstart"), ("cnn", 64, "caldarola-cifar10")]
    if not quick:
        settings.append(("resnet18", 50, "fl-simulator-cifar10 batch"))
    rows = []
    for model_name, batch, preset in settings:
        n = (128 if quick else 512) if model_name == "cnn" or on_gpu else 150
        n = 2000 if on_gpu and not quick else n
        images, labels = images_for(n, data_dir, device)
        torch.manual_seed(0)
        model = build_model(model_name, 10).to(device)
        fmt = torch.channels_last if on_gpu else torch.contiguous_format
        model = model.to(memory_format=fmt)
        for spec in OPTIMIZERS:
            times, steps, peak = timed_training(
                model, spec, lambda i: DeviceBatches(images, labels, batch, mean=MEAN, std=STD, augment=True,
                                                     shuffle=True, seed=i, memory_format=fmt),
                1, device, repeats, autocast)
            median = statistics.median(times)
            rows.append({"model": model_name, "batch": batch, "preset": preset, "optimizer": spec,
                         "images": n, "steps": steps, "seconds_median": median,
                         "images_per_s": n / median, "step_ms": 1000 * median / steps, "peak_mib": peak,
                         "runs": times})
    for row in rows:
        sgd = next(r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                   and r["optimizer"] == "sgd")
        row["step_time_vs_sgd"] = row["step_ms"] / sgd["step_ms"]
    return rows


# ----------------------------------------------------------------------------- (c)

class PerImage(torch.utils.data.Dataset):
    """FL-Simulator's data path: a map-style dataset that crops, flips and normalises one image per
    call, read by a ``DataLoader`` (the same augmentation as ``DeviceBatches``, image by image)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision.transforms import v2

        self.images, self.labels = images.cpu(), labels.cpu()
        self.transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]

    @classmethod
    def loader(cls, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
               device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches on ``device``, drawn anew each pass, as a training loop iterates them."""
        loader = torch.utils.data.DataLoader(cls(images, labels), batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))

        class OnDevice:
            def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                return ((x.to(device), y.to(device)) for x, y in loader)

        return OnDevice()


def plain_loop(cfg, data, rounds: int, per_image: bool = False) -> list[float]:
    """The same client work as ``fedsam run``, without Flower or Ray: per round, each sampled
    client trains on its partition with the same seeds, then an example-weighted average. With
    ``per_image``, the peer's design instead: batches from a ``DataLoader`` augmenting image by
    image on the host (``PerImage``), one client after another in one process."""
    from fedsam.worker import client_batches, client_indices, device_data, local_optimizer
    from fedsam import wire
    from fedsam.runtime import eval_batch_size, round_seed
    from fedsam.train import evaluate
    from strategies import ClientSampler

    device = resolve_device(cfg.device)
    dd = device_data(cfg.dataset, cfg.data_dir, str(device))
    parts = client_indices(cfg.dataset, cfg.data_dir, cfg.partition_spec(), str(device))
    torch.manual_seed(cfg.seed)
    global_model = build_model(cfg.model, dd.num_classes, cfg.norm).to(device)
    worker = build_model(cfg.model, dd.num_classes, cfg.norm).to(device)
    sampler = ClientSampler(cfg.num_clients, cfg.clients_per_round, cfg.seed, cfg.client_sampling)
    test = DeviceBatches(data.test_images.to(device), data.test_labels.to(device), eval_batch_size(device),
                         mean=dd.mean, std=dd.std)
    config = wire.train_config(cfg)  # what a client of `fedsam run` reads; the lr does not decay here
    seconds = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        config[wire.SERVER_ROUND] = rnd
        states, weights = [], []
        for pid in sampler.sample(rnd):
            seed = round_seed(cfg.seed, rnd, pid)
            torch.manual_seed(seed)
            worker.load_state_dict(global_model.state_dict())
            optimizer = local_optimizer(worker, cfg.optimizer, wire.optimizer_options(config, pid))
            idx = parts[pid]
            if per_image:
                batches = PerImage.loader(dd.images[idx], dd.labels[idx], cfg.batch_size, seed, device)
            else:
                batches = client_batches(dd, idx, cfg.batch_size, seed, worker, device)
            train_locally(worker, optimizer, batches, cfg.local_epochs)
            states.append({k: v.detach().clone() for k, v in worker.state_dict().items()})
            weights.append(len(idx))
        total = float(sum(weights))
        averaged = {k: sum(w / total * s[k].double() for w, s in zip(weights, states)).to(states[0][k].dtype)
                    for k in states[0]}
        global_model.load_state_dict(averaged)
        evaluate(global_model, test)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _steady_median(seconds: list[float]) -> float:
    """The median round after the first (which also starts the Ray workers), or the only one."""
    return statistics.median(seconds[1:] or seconds)


@dataclass(frozen=True)
class TimedRun:
    """One ``fedsam run`` timed from outside: launch to exit, launch to round 1's progress line,
    and each round's own seconds (``metrics.jsonl``)."""

    wall: float
    round_one_done: float
    rounds: list[float]

    @property
    def startup(self) -> float:
        """Launch until the ServerApp starts round 1's clock: Python, imports, the checks, Flower's
        set-up (Ray's own start runs on into round 1, beside it)."""
        return self.round_one_done - self.rounds[0]

    @property
    def teardown(self) -> float:
        """After the last round's line: its checkpoint, the final files and Ray's shutdown."""
        return self.wall - self.round_one_done - sum(self.rounds[1:])


RUN_TIMEOUT = 3600  # seconds a timed fedsam run may take before the bench gives up on it


def _timed_fedsam_run(flags: dict[str, Any], what: str = "the fedsam run for (c)") -> TimedRun:
    started = time.perf_counter()
    round_one_done, tail = None, collections.deque(maxlen=5)
    proc = subprocess.Popen(run_command(flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", start_new_session=True)  # its own group: Ray too
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(RUN_TIMEOUT, stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        for line in proc.stdout:  # stamped as they come: round 1's line marks the end of round 1
            if round_one_done is None and results.RunRecorder.progress_round(line) == 1:
                round_one_done = time.perf_counter() - started
            tail.append(line.rstrip())
        returncode = proc.wait()
    except BaseException:  # Ctrl-C too: the run is in a session of its own and would not see it
        stop()
        raise
    finally:
        watchdog.cancel()
        proc.stdout.close()
    wall = time.perf_counter() - started
    if expired.is_set():
        raise RuntimeError(f"{what} took over {RUN_TIMEOUT} s and was stopped")
    if returncode != 0 or round_one_done is None:
        raise RuntimeError(f"{what} failed; its last lines:\n" + "\n".join(tail))
    records = results.read_metrics(Path(flags["out"]))
    return TimedRun(wall, round_one_done, [r["seconds"] for r in records])


def overhead(device: torch.device, quick: bool, data_dir: str | None, rounds: int, scratch: Path) -> dict[str, Any]:
    """``fedsam run`` as users run it (a core per client, so clients of a round train side by side in
    Ray actors), and, unless ``quick``, with every core per client, so clients train one after the
    other with the same threads as the plain loop: the second isolates what Flower and Ray add."""
    from fedsam.data.synthetic import write_cifar10
    from simulations import config as configuration

    if data_dir is None:
        data_dir = str(write_cifar10(scratch / "data", per_batch=100 if quick else 400))
    clients, per_round = (2, 2) if quick else (10, 5)
    flags = {"data_dir": data_dir, "num_clients": clients, "clients_per_round": per_round, "rounds": rounds,
             "strategy": "fedavg", "optimizer": "sgd", "batch_size": 32, "local_epochs": 1,
             "device": device.type, "checkpoint_every": rounds, "out": str(scratch / "run")}
    run = _timed_fedsam_run(flags)
    cfg = configuration.apply(configuration.ExperimentConfig(), flags, "bench").resolved()
    data = load("cifar10", data_dir)
    plain_loop(cfg, data, 1)  # warm-up: dataset on the device, partition, model
    plain = plain_loop(cfg, data, rounds)
    plain_round = _steady_median(plain)
    peer = plain_loop(cfg, data, rounds, per_image=True)
    result = {
        "rounds": rounds, "clients": clients, "clients_per_round": per_round, "model": "cnn", "optimizer": "sgd",
        "num_cpus_per_client": 1,
        "fedsam_run_wall_seconds": run.wall,
        "startup_seconds": run.startup,
        "startup_plus_round_one_seconds": run.round_one_done,
        "first_round_extra_seconds": run.rounds[0] - _steady_median(run.rounds),
        "teardown_seconds": run.teardown,
        "round_seconds_fedsam_run": run.rounds,
        "round_seconds_plain_loop": plain,
        "per_round_overhead_ratio": _steady_median(run.rounds) / plain_round,
        "round_seconds_per_image_loop": peer,
        "fedsam_run_vs_per_image_loop": _steady_median(run.rounds) / _steady_median(peer),
        "note": "round 1 of fedsam run includes starting the Ray workers; the ratio uses rounds 2..R; start-up and "
                "round 1 are timed from launch to round 1's progress line",
    }
    if not quick:
        cores = os.cpu_count() or 1
        matched = _timed_fedsam_run({**flags, "num_cpus_per_client": cores, "out": str(scratch / "run-matched")})
        result["matched_threads"] = {"num_cpus_per_client": cores, "fedsam_run_wall_seconds": matched.wall,
                                     "startup_seconds": matched.startup,
                                     "startup_plus_round_one_seconds": matched.round_one_done,
                                     "round_seconds_fedsam_run": matched.rounds,
                                     "per_round_overhead_ratio": _steady_median(matched.rounds) / plain_round}
    return result


# ----------------------------------------------------------------------------- (d)

def quickstart_dataset(images: np.ndarray, labels: np.ndarray):
    """The Flower quickstart's data path: a Hugging Face dataset of PNG-encoded images, decoded and
    transformed one image at a time by ``with_transform`` (here with the same crop and flip as
    ours, so both sides do the same augmentation)."""
    import datasets
    from PIL import Image
    from torchvision import transforms

    datasets.disable_progress_bars()
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    table = datasets.Dataset.from_dict({"img": [Image.fromarray(img.transpose(1, 2, 0)) for img in images],
                                        "label": labels.tolist()}, features=features)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def apply_transforms(batch: dict) -> dict:
        batch["img"] = [transform(img) for img in batch["img"]]
        return batch

    return table.with_transform(apply_transforms)


def data_paths(device: torch.device, quick: bool, repeats: int, data_dir: str | None) -> list[dict[str, Any]]:
    n, batch = (256 if quick else 1024), 32
    images, labels = images_for(n, data_dir, torch.device("cpu"))
    dataset = quickstart_dataset(images.numpy(), labels.numpy())
    on_device = (images.to(device), labels.to(device))
    autocast = autocast_dtype("auto", device)
    rows = []
    for spec in ("sgd", "sam"):
        torch.manual_seed(0)
        model = build_model("cnn", 10).to(device)

        def loader(i: int):
            g = torch.Generator().manual_seed(i)
            for item in torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, generator=g):
                yield item["img"].to(device, non_blocking=True), item["label"].to(device, non_blocking=True)

        ours, steps, _ = timed_training(model, spec, lambda i: DeviceBatches(
            *on_device, batch, mean=MEAN, std=STD, augment=True, shuffle=True, seed=i), 1, device, repeats, autocast)
        theirs, _, _ = timed_training(model, spec, loader, 1, device, repeats, autocast)
        rows.append({"model": "cnn", "optimizer": spec, "batch": batch, "images": n,
                     "images_per_s_device_batches": n / statistics.median(ours),
                     "images_per_s_dataloader": n / statistics.median(theirs),
                     "speedup": statistics.median(theirs) / statistics.median(ours)})
    return rows


# ----------------------------------------------------------------------------- (e)

FL_SIMULATOR_SETTING = "fl-simulator-cifar10 preset, 100 clients x 500 images, exactly 10 per round"


def fl_simulator_round(device: torch.device, scratch: Path, rounds: int = 3) -> Iterator[tuple[str, dict[str, Any]]]:
    """The FL-Simulator MoFedSAM round end to end: 10 clients x 5 epochs x 500 images, ResNet-18-GN,
    batch 50, through ``fedsam run``, with batched cohorts on, then off: ``(key, figures)`` as each
    run ends."""
    from fedsam.data.synthetic import write_cifar10

    data_dir = write_cifar10(scratch / "fls-data", per_batch=10000, test=1000)
    for vectorize in ("on", "off"):
        flags = {"preset": "fl-simulator-cifar10", "data_dir": data_dir, "rounds": rounds,
                 "client_sampling": "uniform", "eval_every": rounds, "device": device.type,
                 "vectorize": vectorize, "out": scratch / f"fls-{vectorize}"}
        run = _timed_fedsam_run(flags, "the FL-Simulator round")
        yield f"vectorize_{vectorize}", {"round_seconds": run.rounds,
                                         "median_round_seconds_after_first": statistics.median(run.rounds[1:]),
                                         "startup_plus_round_one_seconds": run.round_one_done}


# ----------------------------------------------------------------------------- the command

def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 20)
    skip = set(filter(None, args.skip.split(",")))
    if repeats < 1 or (rounds < 2 and "c" not in skip):
        raise UsageError("--repeats must be >= 1 and --rounds >= 2 (the overhead part compares the rounds after "
                         f"the first, which also starts Ray), got {repeats} and {rounds}")
    out = Path(args.out)  # checked now, not after minutes of measuring
    if (blocker := file_in_the_way(out.parent)) is not None:
        raise UsageError(f"--out {out}: {blocker} is a file, not a folder")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the JSON file, e.g. {out / 'bench.json'}")
    if args.data_dir:
        try:
            load("cifar10", args.data_dir)
        except Exception as exc:  # noqa: BLE001 - one line for any data problem
            raise UsageError(str(exc)) from None
    report: dict[str, Any] = {"machine": machine(device), "fedsam": fedsam_version(), "date": time.strftime("%Y-%m-%d"),
                              "quick": args.quick, "repeats": repeats, "rounds": rounds, "skipped": sorted(skip),
                              "data": args.data_dir or "synthetic"}
    print(f"fedsam bench on {report['machine']['cpu']} ({report['machine']['cores']} cores)"
          + (f", {report['machine']['gpu']}" if device.type == "cuda" else ", no GPU")
          + f"; median of {repeats} after a warm-up"
          + ("; --quick: a smoke run at tiny sizes, its figures are not speed measurements" if args.quick else ""),
          flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    def keep() -> None:
        """What is measured so far, on disk: a bench stopped by a time limit keeps what it finished."""
        out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="fedsam-bench-") as scratch:
        scratch = Path(scratch)
        if "a" not in skip:
            rows = throughput(device, args.quick, repeats, args.data_dir)
            report["throughput"] = rows
            keep()
            print("\n(a, b) local training")
            print(_table(["model", "batch", "optimizer", "images/s", "step ms", "× SGD step", "peak MiB"],
                         [[r["model"], str(r["batch"]), r["optimizer"], f"{r['images_per_s']:.0f}",
                           f"{r['step_ms']:.1f}", f"{r['step_time_vs_sgd']:.2f}",
                           f"{r['peak_mib']:.0f}" if r["peak_mib"] else "—"] for r in rows]), flush=True)
        if "c" not in skip:
            result = overhead(device, args.quick, args.data_dir, rounds, scratch)
            report["overhead"] = result
            keep()
            print(f"\n(c) framework overhead, {rounds} rounds of FedAvg-SGD on {result['clients']} clients")
            print(f"  fedsam run start-up (Python, the checks, Flower): {result['startup_seconds']:.1f} s; "
                  f"round 1 ends {result['startup_plus_round_one_seconds']:.1f} s after launch "
                  f"({result['first_round_extra_seconds']:.1f} s more than a later round: starting the Ray workers); "
                  f"{result['teardown_seconds']:.1f} s after the last round (final files, Ray's shutdown)")
            print(f"  per round: fedsam run {_steady_median(result['round_seconds_fedsam_run']):.2f} s, "
                  f"plain loop {_steady_median(result['round_seconds_plain_loop']):.2f} s "
                  f"→ ratio {result['per_round_overhead_ratio']:.2f}", flush=True)
            print(f"  the peer's design (one process, a DataLoader augmenting image by image): "
                  f"{_steady_median(result['round_seconds_per_image_loop']):.2f} s a round → fedsam run takes "
                  f"{result['fedsam_run_vs_per_image_loop']:.2f}× its time", flush=True)
            if "matched_threads" in result:
                matched = result["matched_threads"]
                print(f"  with {matched['num_cpus_per_client']} cores per client (clients one after another, as in "
                      f"the plain loop): {_steady_median(matched['round_seconds_fedsam_run']):.2f} s "
                      f"→ ratio {matched['per_round_overhead_ratio']:.2f}", flush=True)
        if "d" not in skip:
            rows = data_paths(device, args.quick, repeats, args.data_dir)
            report["data_path"] = rows
            keep()
            print("\n(d) data path, cnn, batch 32")
            print(_table(["optimizer", "DeviceBatches img/s", "DataLoader img/s", "speed-up"],
                         [[r["optimizer"], f"{r['images_per_s_device_batches']:.0f}",
                           f"{r['images_per_s_dataloader']:.0f}", f"{r['speedup']:.2f}×"] for r in rows]), flush=True)
        if "e" not in skip and device.type == "cuda" and not args.quick:
            print("\n(e) FL-Simulator MoFedSAM round through fedsam run (median round after the first)", flush=True)
            result = report["fl_simulator_round"] = {"setting": FL_SIMULATOR_SETTING}
            for key, figures in fl_simulator_round(device, scratch):
                result[key] = figures
                keep()
                print(f"  --{key.replace('_', ' ')}: {figures['median_round_seconds_after_first']:.2f} s a round, "
                      f"{figures['startup_plus_round_one_seconds']:.1f} s from launch to the end of round 1", flush=True)
        if "f" not in skip:
            print("\n(f) a round's client work: one client at a time against one batched cohort", flush=True)
            rows = report["cohorts"] = []

            def measured(row: dict[str, Any]) -> None:
                rows.append(row)
                print("  " + cohort_bench.describe(row), flush=True)
                keep()

            for row in cohort_bench.cohort_sweep(device, repeats, args.quick):
                measured(row)
            if device.type == "cuda" and not args.quick:
                measured(cohort_bench.fl_simulator_round(device, repeats))
                measured(cohort_bench.sparse_round(device, repeats))  # SSAM-F's Fisher refresh, batched
    keep()
    print(f"\nwrote {args.out}")
    return 0
