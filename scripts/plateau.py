"""Has a sweep's accuracy curve levelled off? Window means of test accuracy, per configuration.

``fedsam report``'s "still rising" compares the last 10 % of rounds with the 10 % before. Where the
accuracy swings by several points from round to round (Dirichlet α = 0.1, five of ten clients per
round), a 10-round window is too short to see a slow climb. This prints the mean over seeds of
fixed-width windows (default 20 rounds), the change between the last two, and the least-squares
slope over the last 30 rounds, in points per 10 rounds:

    python -m scripts.plateau runs/decay --window 20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from simulations.report import collect, group, label, mean_std, mean_std_text, sorted_rows, varying_keys


def plateau(seeds: list[np.ndarray], window: int) -> dict[str, np.ndarray | list[int]]:
    """One configuration's curves (one per seed): the last three whole windows ending at the last
    round all seeds reached, their mean per seed, the last change per seed and the slope per seed
    over the last 30 rounds (points per 10 rounds)."""
    rounds = min(len(c) for c in seeds)
    edges = list(range(rounds % window, rounds + 1, window))[-4:]
    means = np.array([[c[a:b].mean() for a, b in zip(edges, edges[1:])] for c in seeds])
    tail = min(30, rounds)
    x = np.arange(rounds - tail, rounds)
    slope = np.array([10 * np.polyfit(x, c[rounds - tail:rounds], 1)[0] for c in seeds])
    return {"edges": edges, "means": means, "step": means[:, -1] - means[:, -2], "slope": slope}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--window", type=int, default=20, help="rounds per window (default 20)")
    args = parser.parse_args(argv)
    if args.window < 1:
        print(f"error: --window must be >= 1, got {args.window}", file=sys.stderr)
        return 2
    runs = collect(args.sweep)[0] if args.sweep.is_dir() else []
    rows = [row for row in group(runs) if row.done]
    if not rows:
        print(f"error: no finished runs under {args.sweep}", file=sys.stderr)
        return 2
    keys = varying_keys(rows, args.sweep)
    for row in sorted_rows(rows, keys):
        seeds = [np.array([100 * m["test_accuracy"] for m in r.metrics if m.get("test_accuracy") is not None])
                 for r in row.done]
        name = label(row, keys)
        if min(len(c) for c in seeds) < 2 * args.window:
            print(f"{name}: fewer than two windows of {args.window} rounds")
            continue
        p = plateau(seeds, args.window)
        windows = "  ".join(f"{a + 1}-{b}: {m:.1f}" for a, b, m in zip(p["edges"], p["edges"][1:], p["means"].mean(0)))
        spread = {k: mean_std_text(mean_std(list(p[k])), "+.2f") for k in ("step", "slope")}
        print(f"{name} ({len(seeds)} seeds, {p['edges'][-1]} rounds)  {windows}  "
              f"last step {spread['step']}  slope/10 rounds {spread['slope']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
