"""``fedsam report DIR``: one row per configuration, aggregated over seeds, plus plots.

A *configuration* is everything in a run's config.json except the seed and where and on what
hardware it ran. The table gives, as mean ± standard deviation over seeds (sample std):

- the final test accuracy, and the mean over the last 10% of rounds (Caldarola et al.'s metric);
- *still rising*: that last-10% mean minus the mean of the 10% of rounds before it, in points; a
  curve has flattened when this is near zero, and a clearly positive value asks for more rounds;
- the best test accuracy; the rounds to reach ``--target``; the wall time;
- the final sharpness (top Hessian eigenvalue), when the runs recorded it (``--sharpness-every``);
- when any run recorded them (older runs did not): the final top-5 test accuracy; the client drift
  (mean over a round's clients of ‖Δ_i − Δ̄‖ / ‖Δ̄‖) averaged over the last 10% of rounds, which says
  how far heterogeneity pulls the clients apart; and the final norm of the method's correction state
  (SCAFFOLD's control variate, FedDyn's h, FedCM's momentum, ...), which shows whether it settles;
- against the FedAvg + SGD configuration with the same other settings: the difference in final
  accuracy ± its standard error, called *better* or *worse* only when a two-sided t-test at the 5%
  level says so: paired over the seeds when both configurations finished the same seeds (they share
  the split and the starting model), Welch's otherwise.

A run whose config.json or summary.json is broken is listed as refused, with the reason, and left
out of the table and the figures; a metrics.jsonl line that is no round record is skipped and
named (file and line) in report.md.

Written into DIR: ``report.md``, ``report.csv``, ``curves.png`` (accuracy against round, a band
of ±1 std across seeds), ``alpha.png`` (final accuracy against Dirichlet α, when α varies) and
``sharpness.png`` (when sharpness was recorded), ``drift.png`` (client drift against round, when
recorded) and ``correction.png`` (the correction state's norm against round, when recorded).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulations.errors import UsageError
from simulations import results
from simulations.config import RESUMABLE, SERVER_FIELDS, key, method_keys

NOT_CONFIGURATION = {"seed", "out", "data-dir", "download", "device",
                     *(key(name) for name in RESUMABLE if name != "rounds")}  # what a resume may change
METHOD_KEYS = method_keys()
# Optional per-round diagnostics: (metrics key, table header, CSV prefix). A column appears only when
# some finished run recorded the key, so a table of older runs keeps its shape.
DIAGNOSTICS = (("test_top5_accuracy", "final top-5 acc %", "top5"),
               ("client_drift", "client drift (last 10%)", "drift"),
               ("correction_norm", "correction norm", "correction"))


@dataclass
class RunResult:
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    error: str | None = None


@dataclass
class Row:
    key: tuple
    config: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)

    @property
    def done(self) -> list[RunResult]:
        return [r for r in self.runs if r.summary is not None]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="tables and plots of a sweep (or of one run)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", metavar="DIR", help="a sweep folder, or one run's folder")
    parser.add_argument("--target", type=float, help="accuracy (0-1) for 'rounds to target' "
                        "(default: 80%% of the best configuration's mean final accuracy)")
    parser.set_defaults(handler=run)


SUMMARY_NUMBERS = ("final_test_accuracy", "best_test_accuracy", "wall_seconds")


def check_summary(summary: dict[str, Any], path: Path) -> None:
    """The figures the table and plots take from a summary are numbers (``None``, or absent, where
    a run had nothing to give); ``results.RunFileError`` naming the file and the key otherwise."""
    for name in SUMMARY_NUMBERS:  # a missing one counts as None, as for an old run
        if summary.get(name) is not None and results.finite(summary[name]) is None:
            raise results.RunFileError(f"{path}: {name} is not a finite number ({summary[name]!r})")
    sharpness = summary.get("final_sharpness")  # NaN: a probe that failed, counted as not measured
    if sharpness is not None and (isinstance(sharpness, bool) or not isinstance(sharpness, (int, float))):
        raise results.RunFileError(f"{path}: final_sharpness is not a number ({sharpness!r})")


def collect(directory: Path) -> tuple[list[RunResult], list[dict[str, Any]], list[RunResult], list[str]]:
    """The runs under ``directory`` (or the run it is); sweep runs that never wrote a config; runs
    refused because their config.json or summary.json is broken, each with the reason; and notes
    on what was read around (metrics lines skipped, an unreadable sweep.json). A run that cannot be
    used is reported, never dropped unsaid and never mistaken for an unfinished one."""
    single = (directory / results.CONFIG).exists()
    folders = [directory] if single else \
        sorted(p for p in directory.iterdir() if p.is_dir() and (p / results.CONFIG).exists())
    notes: list[str] = []
    try:
        sweep = results.load_object(directory / "sweep.json") or {}
    except results.RunFileError as exc:
        sweep = {}
        notes.append(f"{exc}: runs that failed before writing their folder may be missing from this report")
    errors = {name: entry.get("error") for name, entry in sweep.get("runs", {}).items()}
    runs, refused = [], []
    for folder in folders:
        try:
            config = results.load_object(folder / results.CONFIG)
            summary = results.load_object(folder / results.SUMMARY)
            if summary is not None:
                check_summary(summary, folder / results.SUMMARY)
        except results.RunFileError as exc:
            refused.append(RunResult(folder.name, {}, [], None, str(exc)))
            continue
        skipped: list[tuple[int, str]] = []
        metrics = results.read_metrics(folder, skipped)
        where = results.METRICS if single else f"{folder.name}/{results.METRICS}"
        notes += [f"`{where}` line {number}: {why}; the line was skipped" for number, why in skipped]
        error = None if summary else (errors.get(folder.name) or "unfinished (no summary.json)")
        runs.append(RunResult(folder.name, config or {}, metrics, summary, error))
    known = {r.name for r in runs} | {r.name for r in refused}
    lost = [{"name": name, "error": entry.get("error") or entry.get("status")}
            for name, entry in sweep.get("runs", {}).items()
            if name not in known and entry.get("status") in ("failed", "stopped", "running", "pending")]
    return runs, lost, refused, notes


def group(runs: list[RunResult]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for r in runs:
        config = {k: v for k, v in r.config.items() if k not in NOT_CONFIGURATION}
        key = tuple(sorted((k, json.dumps(v)) for k, v in config.items()))
        rows.setdefault(key, Row(key, config)).runs.append(r)
    return list(rows.values())


def varying_keys(rows: list[Row], directory: Path) -> list[str]:
    """The settings that tell the rows apart: a sweep's ``--vary`` keys when they suffice (so that
    settings derived from them, like the optimizer a strategy implies, do not clutter the labels),
    otherwise every setting that differs."""
    keys = sorted({k for row in rows for k in row.config})
    differing = [k for k in keys if len({json.dumps(row.config.get(k)) for row in rows}) > 1]
    sweep = results.read_object(directory / "sweep.json")
    vary = [k for k in (sweep.get("vary", {}) if isinstance(sweep, dict) else {}) if k in differing]
    if vary and len({tuple(json.dumps(row.config.get(k)) for k in vary) for row in rows}) == len(rows):
        return vary
    return differing


def sorted_rows(rows: list[Row], keys: list[str]) -> list[Row]:
    """Rows ordered by the varying keys, numbers numerically (α = 0.1 before 1 before 100)."""
    def value(v: Any) -> tuple:
        return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
    return sorted(rows, key=lambda row: [value(row.config.get(k)) for k in keys])


def recorded(record: dict[str, Any], key: str) -> float | None:
    """``record[key]`` when it is a finite number; ``None`` when absent, null (a round that did not
    measure it) or anything else, so that a stray value never reaches a mean or a log axis."""
    return results.finite(record.get(key))


def last_tenth_mean(metrics: list[dict[str, Any]], tenths_back: int = 0, key: str = "test_accuracy") -> float | None:
    """Mean of ``key`` (test accuracy unless told) over the rounds among the last 10% of rounds that
    recorded it (at least the last such round); ``tenths_back=1`` takes the 10% of rounds before those."""
    if not metrics:
        return None
    rounds = metrics[-1]["round"]
    width = max(1, math.ceil(0.1 * rounds))
    last = rounds - tenths_back * width
    values = [v for m in metrics if last - width < m["round"] <= last and (v := recorded(m, key)) is not None]
    if not values and tenths_back == 0:
        values = [v for m in metrics if (v := recorded(m, key)) is not None][-1:]
    return float(np.mean(values)) if values else None


def final_value(metrics: list[dict[str, Any]], key: str) -> float | None:
    """The last round's value of ``key`` among the rounds that recorded it."""
    return next((v for m in reversed(metrics) if (v := recorded(m, key)) is not None), None)


def diagnostic(metrics: list[dict[str, Any]], key: str) -> float | None:
    """One run's figure for a ``DIAGNOSTICS`` column: drift is noisy round to round, so it is
    averaged over the last 10% of rounds; accuracy and the correction norm are taken at the end."""
    return last_tenth_mean(metrics, key=key) if key == "client_drift" else final_value(metrics, key)


def recorded_diagnostics(rows: list[Row]) -> list[tuple[str, str, str]]:
    """The ``DIAGNOSTICS`` some finished run recorded (a number in at least one round)."""
    return [d for d in DIAGNOSTICS
            if any(recorded(m, d[0]) is not None for row in rows for r in row.done for m in r.metrics)]


def late_trend(metrics: list[dict[str, Any]]) -> float | None:
    """How much the curve still climbs: the last 10% of rounds' mean accuracy minus the 10% before.
    Near zero when the curve has flattened; a clearly positive value means more rounds would help."""
    last, before = last_tenth_mean(metrics), last_tenth_mean(metrics, tenths_back=1)
    return None if last is None or before is None else last - before


def rounds_to(metrics: list[dict[str, Any]], target: float) -> int | None:
    return next((m["round"] for m in metrics if (m.get("test_accuracy") or 0) >= target), None)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std; one value has no spread to speak of, so its std is None, not 0."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def row_stats(row: Row, target: float) -> dict[str, Any]:
    done = row.done
    reached = [rounds_to(r.metrics, target) for r in done]
    stats = {
        "final": mean_std([r.summary.get("final_test_accuracy") for r in done]),
        "last10": mean_std([last_tenth_mean(r.metrics) for r in done]),
        "trend": mean_std([late_trend(r.metrics) for r in done]),
        "best": mean_std([r.summary.get("best_test_accuracy") for r in done]),
        "wall": mean_std([r.summary.get("wall_seconds") for r in done]),
        "sharpness": mean_std([results.finite(r.summary.get("final_sharpness")) for r in done]),
        "unconverged": sum(r.summary.get("final_sharpness_converged") is False
                           and results.finite(r.summary.get("final_sharpness")) is not None for r in done),
        **{key: mean_std([diagnostic(r.metrics, key) for r in done]) for key, _, _ in DIAGNOSTICS},
        "to_target": mean_std([x for x in reached if x is not None]),
        "reached": sum(x is not None for x in reached),
        "seeds": f"{len(done)}/{len(row.runs)}",
        "n": len(done),
    }
    return stats


def is_baseline(row: Row) -> bool:
    return row.config.get("strategy") == "fedavg" and row.config.get("optimizer") == "sgd"


def baseline_of(row: Row, rows: list[Row]) -> Row | str | None:
    """The FedAvg + SGD row to compare ``row`` with: its settings apart from the method are this
    row's, and of those rows the one that shares most of this row's method settings (a server lr,
    SWA, relaxed initialisation). A tie between several is a string saying so: the report never
    picks one of them silently."""
    if is_baseline(row):
        return None
    rest = {k: v for k, v in row.config.items() if k not in METHOD_KEYS}
    candidates = [other for other in rows if is_baseline(other)
                  and {k: v for k, v in other.config.items() if k not in METHOD_KEYS} == rest]
    if not candidates:
        return None
    shared = [sum(row.config.get(key(k)) == other.config.get(key(k)) for k in SERVER_FIELDS) for other in candidates]
    best = [other for other, n in zip(candidates, shared) if n == max(shared)]
    return best[0] if len(best) == 1 else f"{len(best)} FedAvg+SGD configurations fit equally"


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (``p > 0.5``) of Student's t with ``df`` (possibly fractional) degrees of
    freedom, by bisection on its distribution function (below)."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for ``t ≥ 0``: ``1 − I_x(df/2, 1/2)/2`` with ``x = df/(df + t²)``, the regularized
    incomplete beta function ``I`` evaluated by its continued fraction (modified Lentz)."""
    x, a, b = df / (df + t * t), df / 2, 0.5
    if x >= 1.0:
        return 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        ibeta = front * _beta_fraction(a, b, x) / a
    else:
        ibeta = 1 - front * _beta_fraction(b, a, 1 - x) / b
    return 1 - ibeta / 2


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return value


#: The two-sided level of the better/worse verdict.
SIGNIFICANCE = 0.05


def versus(row: Row, base: Row) -> tuple[float | None, float | None, str]:
    """Mean final accuracy of ``row`` minus ``base``'s (the table's means), the standard error of
    that difference, and the verdict of a two-sided t-test at ``SIGNIFICANCE``: paired over the
    seeds when both finished the same seeds once each (same split and starting model per seed),
    Welch's unpaired test over every run otherwise."""
    mine, theirs = finals_by_seed(row), finals_by_seed(base)
    a, b = [v for _, v in mine], [v for _, v in theirs]
    if not a or not b:
        return None, None, ""
    delta = float(np.mean(a) - np.mean(b))
    by_seed_a, by_seed_b = dict(mine), dict(theirs)
    if len(by_seed_a) == len(a) and len(by_seed_b) == len(b) and set(by_seed_a) == set(by_seed_b) and len(a) > 1:
        differences = [by_seed_a[s] - by_seed_b[s] for s in by_seed_a]
        se, df = float(np.std(differences, ddof=1)) / math.sqrt(len(differences)), len(differences) - 1
    elif len(a) > 1 and len(b) > 1:
        va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
        se = float(math.sqrt(va + vb))
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else 1.0
    else:  # a single seed has no spread, so no standard error
        return delta, None, "one seed: no verdict"
    if abs(delta) <= t_quantile(1 - SIGNIFICANCE / 2, df) * se:
        return delta, se, "no clear difference"
    return delta, se, "better" if delta > 0 else "worse"


def finals_by_seed(row: Row) -> list[tuple[Any, float]]:
    """Each finished run's (seed, final test accuracy); a run without a seed pairs with nothing."""
    return [(r.config.get("seed", ("no seed", r.name)), value) for r in row.done
            if (value := results.finite(r.summary.get("final_test_accuracy"))) is not None]


def mean_std_text(pair: tuple[float | None, float | None], fmt: str, scale: float = 1.0) -> str:
    """"mean ± std", or just the mean when there is one seed, or "—" when there is nothing."""
    m, s = pair
    spread = fmt.lstrip("+")  # a signed mean ("+1.20"), an unsigned spread ("± 0.40")
    return "—" if m is None else f"{scale * m:{fmt}}" + ("" if s is None else f" ± {scale * s:{spread}}")


def label(row: Row, keys: list[str]) -> str:
    return " ".join(f"{k}={row.config.get(k)}" for k in keys) or "all runs"


def build_table(rows: list[Row], keys: list[str], target: float) -> tuple[list[str], list[list[str]], list[dict]]:
    diagnostics = {key: (title, prefix) for key, title, prefix in recorded_diagnostics(rows)}
    top5 = [k for k in diagnostics if k == "test_top5_accuracy"]  # beside the final top-1
    after = [k for k in diagnostics if k != "test_top5_accuracy"]  # beside the sharpness
    formats = {"test_top5_accuracy": (".2f", 100), "client_drift": (".3f", 1), "correction_norm": (".3g", 1)}
    header = ["configuration", "seeds", "final acc %", *(diagnostics[k][0] for k in top5), "last-10% acc %",
              "still rising (pts)", "best acc %", f"rounds to {100 * target:g}%",
              "wall time s", "sharpness λ_max", *(diagnostics[k][0] for k in after), "vs FedAvg+SGD (final, pts)"]
    stats = {row.key: row_stats(row, target) for row in rows}
    lines, records = [], []
    for row in rows:
        st = stats[row.key]
        base = baseline_of(row, rows)
        delta, se, verdict = versus(row, base) if isinstance(base, Row) else (None, None, "")
        if is_baseline(row):
            compare = "baseline"
        elif isinstance(base, str):
            compare = f"— ({base})"
        elif delta is None:
            compare = "—"
        else:
            spread = "" if se is None else f" ± {100 * se:.2f}"
            compare = f"{100 * delta:+.2f}{spread}: {verdict}"
        to_target = "never" if st["reached"] == 0 else \
            f"{st['to_target'][0]:.0f}" + ("" if st["reached"] == st["n"] else f" ({st['reached']}/{st['n']} seeds)")
        shown = {k: mean_std_text(st[k], *formats[k]) for k in diagnostics}
        lines.append([label(row, keys), st["seeds"], mean_std_text(st["final"], ".2f", 100),
                      *(shown[k] for k in top5),
                      *(mean_std_text(st[k], fmt, 100) for k, fmt in (("last10", ".2f"), ("trend", "+.2f"),
                                                                     ("best", ".2f"))),
                      to_target, mean_std_text(st["wall"], ".0f"),
                      mean_std_text(st["sharpness"], ".2f") + (f" ({st['unconverged']} not converged)"
                                                                 if st["unconverged"] else ""),
                      *(shown[k] for k in after), compare])
        records.append({
            "configuration": label(row, keys), **{k: row.config.get(k) for k in keys},
            "seeds_done": st["n"], "seeds_total": len(row.runs),
            "final_mean": st["final"][0], "final_std": st["final"][1],
            "last10_mean": st["last10"][0], "last10_std": st["last10"][1],
            "trend_mean": st["trend"][0], "trend_std": st["trend"][1],
            "best_mean": st["best"][0], "best_std": st["best"][1],
            "rounds_to_target_mean": st["to_target"][0], "seeds_reaching_target": st["reached"],
            "target_accuracy": target, "wall_seconds_mean": st["wall"][0], "wall_seconds_std": st["wall"][1],
            "sharpness_mean": st["sharpness"][0], "sharpness_std": st["sharpness"][1],
            "sharpness_unconverged": st["unconverged"],
            **{f"{prefix}_{part}": st[k][i] for k, (_, prefix) in diagnostics.items()
               for i, part in enumerate(("mean", "std"))},
            "delta_vs_fedavg_sgd": delta, "delta_se": se,
            "verdict": verdict or ("baseline" if compare == "baseline" else base if isinstance(base, str) else ""),
        })
    return header, lines, records


def diagnostics_note(rows: list[Row]) -> str:
    """What the optional columns mean, for those the table shows."""
    shown = {key for key, _, _ in recorded_diagnostics(rows)}
    notes = {"client_drift": " 'client drift' is the mean over a round's clients of ‖Δ_i − Δ̄‖ / ‖Δ̄‖ (Δ_i a "
                             "client's update, Δ̄ their weighted mean), averaged over the last 10% of rounds.",
             "correction_norm": " 'correction norm' is the final L2 norm of the method's correction state "
                                "(SCAFFOLD's control variate, FedDyn's h, FedCM's momentum); — for methods "
                                "without one."}
    return "".join(text for key, text in notes.items() if key in shown)


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a folder")
    runs, lost, refused, notes = collect(directory)
    if not runs and refused:
        more = f" (and {len(refused) - 1} more refused)" if len(refused) > 1 else ""
        raise UsageError(f"{directory} holds no readable run: {refused[0].error}{more}")
    if not runs:
        raise UsageError(f"{directory} holds no runs (no folder with a config.json)")
    if args.target is not None and not 0 < args.target <= 1:
        raise UsageError(f"--target must be an accuracy in (0, 1], got {args.target}")
    rows = group(runs)
    keys = varying_keys(rows, directory)
    rows = sorted_rows(rows, keys)
    finals = [row_stats(row, 1.0)["final"][0] for row in rows]
    finals = [f for f in finals if f is not None]
    target = args.target if args.target is not None else (round(0.8 * max(finals), 3) if finals else 0.5)
    header, lines, records = build_table(rows, keys, target)

    from simulations import plots

    figures = plots.sweep_figures(rows, keys, directory)
    failed = [r for r in runs if r.summary is None] + [RunResult(x["name"], {}, [], None, x["error"]) for x in lost]
    text = [f"# Report: {directory}", "",
            f"{len(runs) + len(lost) + len(refused)} runs, {len(rows)} configurations; mean ± sample std over seeds; "
            f"target accuracy {100 * target:g}%. 'vs FedAvg+SGD' is the difference in mean final accuracy to the "
            "FedAvg + SGD configuration with the same other settings, ± its standard error; *better*/*worse* when a "
            f"two-sided t-test at the {100 * SIGNIFICANCE:g}% level says so (paired over seeds when both finished the "
            "same seeds, Welch's otherwise). "
            "'still rising' is the last 10% of rounds' mean accuracy minus that of the 10% before: near 0 once "
            "a curve has flattened." + diagnostics_note(rows), "",
            markdown_table(header, lines), ""]
    if failed:
        text += ["## Failed or unfinished runs", ""] + [f"- `{r.name}`: {r.error}" for r in failed] + [""]
    if refused:
        text += ["## Refused runs", "", "Left out of the table and the figures: a file the report needs is broken.",
                 ""] + [f"- `{r.name}`: refused: {r.error}" for r in refused] + [""]
    if notes:
        text += ["## Problems in the run files", ""] + [f"- {note}" for note in notes] + [""]
    text += [f"![{name}]({name})" for name in figures]
    (directory / "report.md").write_text("\n".join(text) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    (directory / "report.csv").write_text(buffer.getvalue())
    print(markdown_table(header, lines))
    if failed:
        print(f"{len(failed)} run(s) failed or unfinished: " + ", ".join(r.name for r in failed))
    if refused:
        print(f"{len(refused)} run(s) refused (broken files, see report.md): " + ", ".join(r.name for r in refused))
    print(f"wrote {directory / 'report.md'}, report.csv, " + ", ".join(figures))
    return 0
