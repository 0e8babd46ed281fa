"""Batched cohorts against one client at a time: the client work of a round, timed in process.

Two settings, each run both ways on the same data, seeds and steps:

- the FL-Simulator MoFedSAM round: ResNet-18 (ImageNet stem, GroupNorm(2)), 10 clients x 5 epochs
  x 500 images, batch 50, SAM ρ = 0.1, MoFedSAM's mix (α = 0.1), clipping at 10, weight decay 1e-3;
- a cohort-size sweep: 1, 5, 10 and 100 clients of the CNN (batch 32, one epoch of 50 images each),
  and 1 and 10 clients of ResNet-18-GN (one epoch of 500 images at batch 50);
- with ``--sparse``, an SSAM-F round: 5 fresh CNN clients x one epoch of 500 images at batch 50,
  each refreshing its mask from 1,024 Fisher examples (one backward pass each one client at a
  time; per-example gradients in chunks, batched).

Only the clients' training is timed (from the global weights and each client's images on the
device to each client's trained weights), not making the images, Flower, Ray or evaluation.
Runs without Flower installed: ``python -m simulations.cohort_bench --out cohort.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedsam.cohort import train_cohort
from fedsam.data import DeviceBatches, SingleExamples
from fedsam.data.cifar import LAYOUTS
from fedsam.models import build_model
from fedsam.optim import SPARSE_SAM, build
from fedsam.optim.ssam import SparseState, load_client_state
from fedsam.runtime import autocast_dtype, memory_format, resolve_device
from fedsam.train import train_locally

CIFAR10 = LAYOUTS["cifar10"]
#: one client at a time or one batched cohort, each eager or replayed as a CUDA graph
VARIANTS = ("one_by_one", "one_by_one_graph", "batched", "batched_graph")


def synthetic_data(num: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` clients' random images and labels on ``device``, made once: in ``fedsam run`` a
    worker keeps its data on the device across rounds, so drawing it is not a round's work."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num * size, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    return images, torch.randint(0, 10, (num * size,), generator=g).to(device)


def synthetic_clients(data: tuple[torch.Tensor, torch.Tensor], num: int, batch: int, seed: int = 0
                      ) -> list[DeviceBatches]:
    """The clients' minibatches over ``synthetic_data``: a round's work, as a ClientApp builds them each round."""
    images, labels = data
    size = len(images) // num
    return [DeviceBatches(images[i * size:(i + 1) * size], labels[i * size:(i + 1) * size], batch,
                          mean=CIFAR10.mean, std=CIFAR10.std, augment=True, shuffle=True, seed=seed + i,
                          memory_format=memory_format(images.device))
            for i in range(num)]


def fresh_sparse(clients: list[DeviceBatches]) -> list[SparseState]:
    """Sparse SAM's state of clients in their first round: each its own Fisher stream and generator."""
    return [SparseState(examples=SingleExamples(DeviceBatches(c.images, c.labels, 1, mean=CIFAR10.mean,
                                                              std=CIFAR10.std, augment=True, shuffle=True,
                                                              seed=500 + i, memory_format=c.memory_format)),
                        generator=torch.Generator().manual_seed(900 + i))
            for i, c in enumerate(clients)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return times


def round_both_ways(model_name: str, num: int, size: int, epochs: int, batch: int, spec: str, options: dict,
                    device: torch.device, repeats: int, *, grad_clip: float = 0.0, alpha: float | None = None,
                    precision: str = "auto", variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """One round's client work, one client at a time and as one batched cohort."""
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device).to(memory_format=memory_format(device))
    autocast = autocast_dtype(precision, device)
    momentum = None
    if alpha is not None:
        momentum = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    mix = dict(grad_clip=grad_clip, global_momentum=momentum, momentum_alpha=alpha if alpha is not None else 1.0,
               autocast_dtype=autocast)
    worker = copy.deepcopy(model)
    start_state = copy.deepcopy(model.state_dict())
    first: dict[str, dict[str, torch.Tensor]] = {}  # each variant's first client, trained

    sparse = spec in SPARSE_SAM
    names = [n for n, _ in model.named_parameters()]
    data = synthetic_data(num, size, device)

    def one_by_one(graph: bool) -> dict[str, torch.Tensor]:
        clients = synthetic_clients(data, num, batch)
        for i, (batches, kept) in enumerate(zip(clients, fresh_sparse(clients) if sparse else [None] * num)):
            worker.load_state_dict(start_state)
            optimizer = build(spec, worker.named_parameters(), **options)
            if kept is not None:
                load_client_state(optimizer, worker, kept, names, len(batches), 0)
            train_locally(worker, optimizer, batches, epochs, cuda_graph=graph, **mix)
            if i == 0:
                state = {k: v.detach().clone() for k, v in worker.state_dict().items()}
        return state

    def batched(graph: bool) -> dict[str, torch.Tensor]:
        clients = synthetic_clients(data, num, batch)
        results = train_cohort(model, spec, options, clients, epochs, cuda_graph=graph,
                               sparse=fresh_sparse(clients) if sparse else None, **mix)
        return results[0][0]

    row: dict[str, Any] = {"model": model_name, "clients": num, "images_per_client": size, "epochs": epochs,
                           "batch": batch, "optimizer": spec, "steps_per_client": epochs * -(-size // batch),
                           "precision": precision}
    for name in variants:
        fn = functools.partial(one_by_one if name.startswith("one_by_one") else batched, name.endswith("graph"))
        try:
            times = timed(lambda: first.__setitem__(name, fn()), device, repeats)
            row[f"{name}_seconds"] = statistics.median(times)
            row[f"{name}_runs"] = times
        except Exception as exc:  # noqa: BLE001 - a failed variant is recorded, the others still run
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    reference = first.get("one_by_one")
    for name, state in first.items():
        if reference is not None and name != "one_by_one":  # how far each variant lands from plain eager
            row[f"{name}_max_rel_diff"] = max(((state[k].float() - v.float()).abs().max() /
                                               v.float().abs().max().clamp_min(1e-12)).item()
                                              for k, v in reference.items())
        if reference is not None and name != "one_by_one" and f"{name}_seconds" in row:
            row[f"{name}_speedup"] = row["one_by_one_seconds"] / row[f"{name}_seconds"]
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return row


def fl_simulator_round(device: torch.device, repeats: int) -> dict[str, Any]:
    return round_both_ways("resnet18-fls", 10, 500, 5, 50, "sam",
                           {"lr": 0.1, "rho": 0.1, "weight_decay": 1e-3}, device, repeats, grad_clip=10.0, alpha=0.1)


def cohort_sweep(device: torch.device, repeats: int, quick: bool = False) -> Iterator[dict[str, Any]]:
    """One row per cohort size, as each finishes."""
    settings = [("cnn", n, 50, 32) for n in ((1, 5) if quick else (1, 5, 10, 100))]
    if not quick:
        settings += [("resnet18", n, 500, 50) for n in (1, 10)]
    variants = VARIANTS if device.type == "cuda" else ("one_by_one", "batched")  # no CUDA graphs on a CPU
    for model, n, size, batch in settings:
        yield round_both_ways(model, n, size, 1, batch, "sam", {"lr": 0.05, "rho": 0.1}, device, repeats,
                              variants=variants)


def sparse_round(device: torch.device, repeats: int) -> dict[str, Any]:
    """SSAM-F's first round for 5 CNN clients: the Fisher refresh dominates one client at a time."""
    return round_both_ways("cnn", 5, 500, 1, 50, "ssam-f", {"lr": 0.05, "rho": 0.1}, device, repeats,
                           variants=("one_by_one", "batched"))


def describe(row: dict[str, Any]) -> str:
    cells = [f"{row['model']:>12} x{row['clients']:<3}"]
    for name in VARIANTS:
        if name + "_seconds" in row:
            cells.append(f"{name} {row[name + '_seconds']:.3f} s"
                         + (f" ({row[name + '_speedup']:.2f}x)" if name + "_speedup" in row else ""))
        elif name + "_error" in row:
            cells.append(f"{name} failed ({row[name + '_error'][:80]})")
    return "  ".join(cells)


def graph_check(device: torch.device) -> dict[str, Any]:
    """Replayed graphs must train as eager code does: the CNN in float32, each variant's first
    client against eager one-by-one (``*_max_rel_diff``)."""
    return round_both_ways("cnn", 3, 70, 2, 32, "sam", {"lr": 0.05, "rho": 0.1, "momentum": 0.9,
                                                      "weight_decay": 1e-3},
                           device, 1, grad_clip=1.0, alpha=0.1, precision="fp32")


def profile_cohort(device: torch.device, out: Path) -> None:
    """Where a batched step's time goes: torch.profiler over one 100-client CNN round (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model("cnn", 10).to(device)
    options = {"lr": 0.05, "rho": 0.1}

    data = synthetic_data(100, 50, device)

    def one_round() -> None:
        train_cohort(model, "sam", options, synthetic_clients(data, 100, 32), 1,
                     autocast_dtype=autocast_dtype("auto", device))

    one_round()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_round()
        _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    out.write_text(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n"
                   + prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))
    print(f"profile written to {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.cohort_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CNN cohorts of 1 and 5 only")
    parser.add_argument("--out", default="cohort-bench.json")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    parser.add_argument("--profile", help="also profile one batched 100-client CNN round; kernel table to this file")
    parser.add_argument("--sparse", action="store_true", help="also time an SSAM-F round (5 CNN clients)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    report: dict[str, Any] = {"device": device.type, "torch": torch.__version__,
                              "cudnn_benchmark": args.cudnn_benchmark}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    print(f"cohort bench on {report.get('gpu', 'CPU')}, torch {torch.__version__}", flush=True)
    report["graph_check"] = graph_check(device)
    print("graph check (fp32):", {k: v for k, v in report["graph_check"].items() if k.endswith("diff")}, flush=True)
    report["cohort_sweep"] = []
    out = Path(args.out)
    for row in cohort_sweep(device, args.repeats, args.quick):
        report["cohort_sweep"].append(row)
        print(describe(row), flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # what finished survives a time-out
    if not args.quick:
        report["fl_simulator_round"] = fl_simulator_round(device, args.repeats)
        print("FL-Simulator MoFedSAM round:", describe(report["fl_simulator_round"]), flush=True)
    if args.sparse:
        report["sparse_round"] = sparse_round(device, args.repeats)
        print("SSAM-F round:", describe(report["sparse_round"]), flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.profile:
        profile_cohort(device, Path(args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
