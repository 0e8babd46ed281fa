"""How much a round could gain from packing its cohorts optimally instead of longest-first.

On a CPU, ``fedsam run`` sends each of its Ray workers one cohort of the round's clients, trained
one after another and packed by examples, largest client first (``fedsam.wire.split``). A round's
training lasts as long as its busiest worker. This script takes a run's split and, over every
possible sample of ``clients-per-round`` clients (the rounds sample uniformly), compares the
busiest worker's examples under longest-first packing, under the best packing (found by trying
every assignment), and under a perfect share (the examples divided evenly, which whole clients
rarely allow). It reads the split only; nothing is trained.

    python -m scripts.packing_gap --data-dir ../shared/data/cifar10-subset --num-clients 10
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from statistics import fmean

from fedsam.wire import split
from simulations import config as configuration

#: Above this many assignments per sample the best packing is not searched (workers ** (clients - 1)).
MAX_ASSIGNMENTS = 1 << 16


@dataclass(frozen=True)
class Gap:
    """What each packing leaves on the busiest worker, averaged over every sample of a round."""

    samples: int
    longest_first: float  # mean over the samples of the busiest worker's examples
    best: float
    perfect_share: float
    samples_where_best_is_shorter: int


def busiest(cohorts: list[list[int]], work: list[int]) -> int:
    """The round's training lasts as long as its busiest worker's clients."""
    return max(sum(work[pid] for pid in cohort) for cohort in cohorts)


def best_makespan(pids: tuple[int, ...], workers: int, work: list[int]) -> int:
    """The busiest worker's examples under the best assignment of ``pids`` to ``workers``."""
    if workers ** (len(pids) - 1) > MAX_ASSIGNMENTS:
        raise ValueError(f"{workers} workers and {len(pids)} clients a round: too many assignments to try")
    best = sum(work[pid] for pid in pids)
    rest = pids[1:]
    for assignment in itertools.product(range(workers), repeat=len(rest)):  # the first client's worker is fixed
        loads = [0] * workers
        loads[0] = work[pids[0]]
        for pid, worker in zip(rest, assignment):
            loads[worker] += work[pid]
        best = min(best, max(loads))
    return best


def packing_gap(work: list[int], clients_per_round: int, workers: int) -> Gap:
    """Longest-first against the best packing, over every sample of ``clients_per_round`` of ``work``'s clients."""
    lpt, best, share, shorter = [], [], [], 0
    for sample in itertools.combinations(range(len(work)), clients_per_round):
        lpt.append(busiest(split(list(sample), workers, work), work))
        best.append(best_makespan(sample, workers, work))
        share.append(sum(work[pid] for pid in sample) / min(workers, len(sample)))
        shorter += best[-1] < lpt[-1]
    return Gap(len(lpt), fmean(lpt), fmean(best), fmean(share), shorter)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configuration.add_flags(parser, ("data", "partition"))
    parser.add_argument("--clients-per-round", type=int, default=configuration.ExperimentConfig.clients_per_round)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers a round's cohorts go to (default: 2)")
    args = parser.parse_args(argv)
    cfg = configuration.apply(configuration.ExperimentConfig(), configuration.flags_given(args), "command line")
    from fedsam.data.cifar import load
    from fedsam.data.partition_cache import cached_partition

    data = load(cfg.dataset, cfg.data_dir)
    sizes = [int(n) for n in cached_partition(data.train_labels.numpy(), cfg.partition_spec(), data.num_classes).sizes()]
    gap = packing_gap(sizes, args.clients_per_round, args.workers)
    print(f"client sizes: {sizes}")
    print(f"{gap.samples} samples of {args.clients_per_round} clients on {args.workers} workers; the busiest worker's "
          "examples, mean over the samples:")
    print(f"  longest-first {gap.longest_first:8.1f}")
    print(f"  best packing  {gap.best:8.1f}  ({1 - gap.best / gap.longest_first:.2%} less; shorter in "
          f"{gap.samples_where_best_is_shorter} of {gap.samples} samples)")
    print(f"  perfect share {gap.perfect_share:8.1f}  ({1 - gap.perfect_share / gap.longest_first:.2%} less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
