"""The run folder: what a run leaves there, and the one place its files are named, read and written.

| file | content |
|---|---|
| ``config.json`` | the resolved experiment config (every flag), written before the run starts |
| ``partition.json`` | the split: clients' training-set indices and its heterogeneity summary |
| ``metrics.jsonl`` | one JSON object per round, appended when the round ends |
| ``summary.json`` | final and best test accuracy, wall time, written at the end |
| ``model.pt`` | the final global model's ``state_dict`` (with SWA: the SWA average) |
| ``model-global.pt`` | with SWA only: the last plain global model |
| ``checkpoint.pt`` | the state to continue from (``fedsam run --resume``), every ``--checkpoint-every`` rounds |
| ``accuracy.png`` | test accuracy and train loss against round |
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

CONFIG, PARTITION, METRICS, SUMMARY = "config.json", "partition.json", "metrics.jsonl", "summary.json"
MODEL, CHECKPOINT, CURVES = "model.pt", "checkpoint.pt", "accuracy.png"
GLOBAL_MODEL = "model-global.pt"  # with SWA: the last plain global model (model.pt holds the SWA average)
RUN_FILES = (CONFIG, METRICS, SUMMARY)  # any of them means a run lives in the folder
LISTING = " ".join((CONFIG, PARTITION, METRICS, SUMMARY, MODEL, CURVES))  # what a finished run holds


class RunFileError(ValueError):
    """A run file that is there but cannot be used; the message names the file and says why."""


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def load_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, ``None`` when there is no such file, and ``RunFileError`` when
    the file is there but unreadable, not JSON or not an object: a broken file is never taken for a
    missing one (a report that called a run with a broken summary "unfinished" would lie)."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise RunFileError(f"{path} is unreadable ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RunFileError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path} holds {JSON_TYPES.get(type(value), 'a value')}, not a JSON object")
    return value


def read_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when it is missing or broken alike (``load_object``
    tells the two apart, for callers that must)."""
    try:
        return load_object(path)
    except RunFileError:
        return None


def read_config(out: Path) -> dict[str, Any] | None:
    """The run's saved settings (dashed keys), or ``None`` when the folder holds no readable one."""
    return read_object(out / CONFIG)


def read_summary(out: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or ``None`` while it is unfinished."""
    return read_object(out / SUMMARY)


def is_finished(out: Path) -> bool:
    return (out / SUMMARY).is_file()


def holds_a_run(out: Path) -> str | None:
    """The first run file in ``out``, if a run already lives there."""
    for name in RUN_FILES:
        if (out / name).exists():
            return name
    return None


def _round_problem(record: Any) -> str | None:
    """Why a parsed ``metrics.jsonl`` line is no round record (``None`` when it is one): the
    report plots and averages ``round`` and ``test_accuracy``, so those must be numbers."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("round"), int) or isinstance(record.get("round"), bool):
        return "no integer 'round'"
    accuracy = record.get("test_accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))):
        return "'test_accuracy' is not a number"
    return None


def rounds_recorded(out: Path) -> int:
    """How far a run under way has got, cheaply: the lines in its metrics.jsonl (a resumed run's
    included), for progress lines; ``read_metrics`` is the careful read."""
    try:
        return sum(1 for line in (out / METRICS).read_text(errors="replace").splitlines() if line.strip())
    except OSError:
        return 0


def read_metrics(out: Path, skipped: list[tuple[int, str]] | None = None) -> list[dict[str, Any]]:
    """The rounds in the run's ``metrics.jsonl`` (none if it has no such file). A line that is not a
    round record (a torn write, a bad edit) is skipped with a warning rather than ending the read:
    later rounds are still good data. ``skipped``, if given, gets (line number, why) of each, so a
    report can say so too."""
    path = out / METRICS
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        problem = _round_problem(record)
        if problem is not None:
            sys.stderr.write(f"warning: {path}:{number}: {problem}, line skipped\n")
            if skipped is not None:
                skipped.append((number, problem))
            continue
        records.append(record)
    return records


def finite(value: Any) -> float | None:
    """``value`` when it is a finite number (not a bool), else ``None``: what every reader of the run
    files takes as "measured", so that a stray value never reaches a mean, a verdict or an axis."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunRecorder:
    """Appends a line to ``metrics.jsonl`` per round, prints progress, writes the summary at the end."""

    def __init__(self, out: Path, rounds: int, title: str, echo: bool = True,
                 records: list[dict[str, Any]] | None = None, earlier_seconds: float = 0.0) -> None:
        """``records``: the rounds already done (from a checkpoint); ``metrics.jsonl`` is rewritten
        to hold exactly those, dropping any round written after the checkpoint. ``earlier_seconds``:
        the time those rounds took, so that "elapsed" counts the whole run, not since the resume."""
        self.out, self.rounds, self.title, self.echo = out, rounds, title, echo
        self.earlier_seconds = earlier_seconds
        self.records: list[dict[str, Any]] = list(records or [])
        tmp = out / (METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, out / METRICS)
        self.started = time.monotonic()
        self.first_round = len(self.records) + 1

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.echo:
            print(self.progress_line(record), flush=True)

    def progress_line(self, record: dict[str, Any]) -> str:
        """``round  3/20 · test acc ...``: what a run prints after each round (``progress_round`` reads it)."""
        done = record["round"] - self.first_round + 1
        elapsed = time.monotonic() - self.started  # this session's pace gives the ETA
        eta = elapsed / done * (self.rounds - record["round"])
        parts = [f"round {record['round']:>{len(str(self.rounds))}}/{self.rounds}"]
        if record.get("test_accuracy") is not None:
            model = " (SWA model)" if "swa_models" in record else ""  # from --swa-start on, the average is evaluated
            parts.append(f"test acc{model} {record['test_accuracy']:.4f}  loss {record['test_loss']:.3f}")
        parts.append(f"train loss {record['train_loss']:.3f}")
        if record.get("sharpness") is not None:
            parts.append(f"λ_max {record['sharpness']:.1f}" + ("" if record.get("sharpness_converged", True)
                                                                else " (not converged)"))
        if record.get("failed_clients"):
            parts.append(f"{record['failed_clients']} client(s) failed")
        parts.append(f"{record['seconds']:.1f} s")
        parts.append(f"elapsed {duration(self.earlier_seconds + elapsed)}  ETA {duration(eta)}")
        return " · ".join(parts)

    @staticmethod
    def progress_round(line: str) -> int | None:
        """The round a progress line reports, ``None`` for any other line (for tools that watch a run)."""
        words = line.split("/", 1)[0].split()
        return int(words[1]) if len(words) == 2 and words[0] == "round" and words[1].isdigit() else None

    def finish(self, model_state: dict[str, torch.Tensor], wall_seconds: float,
               global_state: dict[str, torch.Tensor] | None = None) -> dict:
        """Write ``model.pt`` (the evaluated model), ``summary.json`` and the curves; with SWA,
        ``global_state`` is the last plain global model, kept as ``model-global.pt``."""
        evaluated = [r for r in self.records if r.get("test_accuracy") is not None]
        reasons: dict[str, int] = {}
        for record in self.records:
            for failure in record.get("failures", []):
                reasons[failure["reason"]] = reasons.get(failure["reason"], 0) + 1
        summary = {
            "rounds": len(self.records),
            "final_test_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
            "final_test_loss": evaluated[-1]["test_loss"] if evaluated else None,
            "best_test_accuracy": max(r["test_accuracy"] for r in evaluated) if evaluated else None,
            "best_round": max(evaluated, key=lambda r: r["test_accuracy"])["round"] if evaluated else None,
            "wall_seconds": wall_seconds,
            "final_sharpness": next((r["sharpness"] for r in reversed(self.records) if "sharpness" in r), None),
            "final_sharpness_converged": next((r.get("sharpness_converged", True) for r in reversed(self.records)
                                               if "sharpness" in r), None),
            "failed_client_rounds": sum(int(r.get("failed_clients", 0)) for r in self.records),
            "failure_reasons": dict(sorted(reasons.items(), key=lambda item: -item[1])),
        }
        torch.save({k: v.detach().cpu() for k, v in model_state.items()}, self.out / MODEL)
        if global_state is not None:
            torch.save({k: v.detach().cpu() for k, v in global_state.items()}, self.out / GLOBAL_MODEL)
        (self.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        from simulations import plots  # matplotlib costs half a second: only when a run ends

        plots.run_curves(self.records, self.out / CURVES, self.title)
        return summary

