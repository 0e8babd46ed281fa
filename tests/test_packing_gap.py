"""``scripts/packing_gap.py``: longest-first packing against the best one, by exhaustive search."""

from __future__ import annotations

import itertools
import random

import pytest

from scripts import packing_gap


def test_the_textbook_case_where_longest_first_is_not_best():
    """3, 3, 2, 2, 2 on two workers: longest-first puts the 3s apart and ends at 7; {3, 3} | {2, 2, 2} ends at 6."""
    gap = packing_gap.packing_gap([3, 3, 2, 2, 2], clients_per_round=5, workers=2)
    assert gap == packing_gap.Gap(samples=1, longest_first=7, best=6, perfect_share=6,
                                  samples_where_best_is_shorter=1)


def test_the_best_packing_lies_between_the_perfect_share_and_longest_first():
    rng = random.Random(0)
    work = [rng.randint(50, 1000) for _ in range(9)]
    for per_round, workers in ((4, 2), (5, 3), (6, 2)):
        gap = packing_gap.packing_gap(work, per_round, workers)
        assert gap.samples == len(list(itertools.combinations(range(9), per_round)))
        assert gap.perfect_share <= gap.best <= gap.longest_first
        assert gap.longest_first <= 4 / 3 * gap.best  # Graham's bound for longest-first


def test_one_worker_takes_everything():
    gap = packing_gap.packing_gap([5, 1, 4], clients_per_round=2, workers=1)
    assert gap.longest_first == gap.best == gap.perfect_share == pytest.approx((6 + 9 + 5) / 3)


def test_a_search_that_would_not_end_is_refused():
    with pytest.raises(ValueError, match="too many assignments"):
        packing_gap.best_makespan(tuple(range(20)), 4, [1] * 20)


def test_the_command_reads_the_runs_split(cifar10_dir, capsys):
    assert packing_gap.main(["--data-dir", str(cifar10_dir), "--num-clients", "6", "--clients-per-round", "3"]) == 0
    out = capsys.readouterr().out
    assert "20 samples of 3 clients on 2 workers" in out
    assert "longest-first" in out and "best packing" in out and "perfect share" in out
