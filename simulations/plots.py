"""PNG figures: the label heatmap of a split, accuracy curves, the heterogeneity plot, and the
per-round diagnostics of a sweep (client drift, the norm of a method's correction state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from simulations.results import finite  # noqa: E402


SHARPNESS_TITLE = "sharpness of the final global model (top Hessian eigenvalue)"
DRIFT_RATIO = r"$\|\Delta_i - \bar{\Delta}\| \,/\, \|\bar{\Delta}\|$"  # mathtext: a plain Δ̄ loses its bar
DRIFT_TITLE = f"client drift: mean over a round's clients of {DRIFT_RATIO}"
CORRECTION_TITLE = "norm of the method's correction state (control variate, dual, momentum)"


def label_heatmap(counts: np.ndarray, classes: Sequence[str], path: str | Path, title: str) -> None:
    """Clients down, classes across, colour = number of samples."""
    num_clients, num_classes = counts.shape
    width = min(max(4.0, 0.45 * num_classes + 2), 16)
    height = min(max(3.0, 0.22 * num_clients + 1.5), 16)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    if num_classes <= 20:
        ax.set_xticks(range(num_classes), classes, rotation=60, ha="right", fontsize=8)
    if num_clients <= 40:
        ax.set_yticks(range(num_clients))
        ax.tick_params(axis="y", labelsize=7)
    if num_clients <= 20 and num_classes <= 12:
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n < 0.6 * counts.max() else "black")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_curves(records: list[dict], path: str | Path, title: str) -> None:
    """Test accuracy and train loss against round, for one run."""
    evaluated = [r for r in records if r.get("test_accuracy") is not None]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    acc_ax.plot([r["round"] for r in evaluated], [r["test_accuracy"] for r in evaluated], marker="." if
                len(evaluated) < 40 else None)
    acc_ax.set_xlabel("round")
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set_ylabel("test accuracy")
    acc_ax.grid(alpha=0.3)
    trained = [r for r in records if r.get("train_loss") is not None]
    loss_ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], color="tab:orange")
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("train loss (clients)")
    loss_ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _label(config: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={config.get(k)}" for k in keys) or "runs"


def _order(values) -> list:
    return sorted(set(values), key=lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))


def _mean_curve(runs, key: str = "test_accuracy") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``key`` against round, mean and std over the runs, on the rounds all of them recorded."""
    curves = []
    for r in runs:
        points = {m["round"]: m[key] for m in r.metrics if finite(m.get(key)) is not None}
        if points:
            curves.append(points)
    if not curves:
        return None
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    if not rounds:  # seeds that recorded it on disjoint rounds have no common curve
        return None
    values = np.array([[c[x] for x in rounds] for c in curves])
    return np.array(rounds), values.mean(axis=0), values.std(axis=0, ddof=1) if len(curves) > 1 else 0 * values[0]


def _style(i: int) -> dict:
    """Line ``i``'s colour and dash: ten colours, then the same ten dashed, then dotted, so a
    study of many methods keeps every line apart."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4]}


def _legend_beside(fig, handles, labels) -> None:
    """The legend right of the plot, one entry a line, however many lines there are (saved with
    ``bbox_inches="tight"`` so nothing is cut)."""
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def metric_curves(rows, keys: list[str], key: str, path: Path, ylabel: str, title: str) -> bool:
    """``key`` against round, one line per configuration (the mean over its finished seeds), log y
    when every value is positive (drift and norms span decades); ``False``, and no file, when no
    run recorded it."""
    curves = [(row, curve) for row in rows if (curve := _mean_curve(row.done, key)) is not None]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    for i, (row, (rounds, mean, _)) in enumerate(curves):
        ax.plot(rounds, mean, label=_label(row.config, keys), marker="." if len(rounds) < 40 else None, **_style(i))
    if all((mean > 0).all() for _, (_, mean, _) in curves):
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _legend_beside(fig, *ax.get_legend_handles_labels())
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def sweep_figures(rows, keys: list[str], directory: Path) -> list[str]:
    """curves.png always; alpha.png, sharpness.png, drift.png and correction.png when there is
    something to show."""
    written = []
    panel_key = next((k for k in ("dirichlet-alpha", "partition", "classes-per-client") if k in keys), None)
    line_keys = [k for k in keys if k != panel_key]
    panels = _order(row.config.get(panel_key) for row in rows) if panel_key else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), dpi=100, sharey=True, squeeze=False)
    for ax, value in zip(axes[0], panels):
        for i, row in enumerate(r for r in rows if panel_key is None or r.config.get(panel_key) == value):
            curve = _mean_curve(row.done)
            if curve is None:
                continue
            rounds, mean, std = curve
            style = _style([_label(r.config, line_keys) for r in rows].index(_label(row.config, line_keys)))
            ax.plot(rounds, mean, label=_label(row.config, line_keys), **style)
            ax.fill_between(rounds, mean - std, mean + std, color=style["color"], alpha=0.2, linewidth=0)
        ax.set_title(f"{panel_key} = {value}" if panel_key else "test accuracy", fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean ± std over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.tight_layout()
    if labels:
        _legend_beside(fig, handles, labels)
    fig.savefig(directory / "curves.png", bbox_inches="tight")
    plt.close(fig)
    written.append("curves.png")

    alphas = _order(row.config.get("dirichlet-alpha") for row in rows) if "dirichlet-alpha" in keys else []
    others = [k for k in keys if k != "dirichlet-alpha"]

    def by_alpha(metric, path: str, ylabel: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=100)
        for name in _order(_label(row.config, others) for row in rows):
            xs, ys, es = [], [], []
            for alpha in alphas:
                row = next((r for r in rows if r.config.get("dirichlet-alpha") == alpha
                            and _label(r.config, others) == name), None)
                values = [metric(r) for r in row.done] if row else []
                values = [v for v in values if v is not None]
                if values:
                    xs.append(alpha)
                    ys.append(np.mean(values))
                    es.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("Dirichlet α (smaller = more heterogeneous)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / path)
        plt.close(fig)
        written.append(path)

    def summary_value(name: str):
        """A summary's figure when it is a finite number, else None (not measured, or not a number)."""
        return lambda r: finite(r.summary.get(name))

    if len(alphas) >= 2:
        by_alpha(summary_value("final_test_accuracy"), "alpha.png", "final test accuracy (mean ± std)",
                 "final test accuracy against heterogeneity")
    sharpness = summary_value("final_sharpness")
    measured = [(row, values) for row in rows if (values := [v for r in row.done if (v := sharpness(r)) is not None])]
    if measured and len(alphas) >= 2:
        by_alpha(sharpness, "sharpness.png", "final λ_max (mean ± std)", SHARPNESS_TITLE)
    elif measured:  # one bar per configuration that measured it: no bar stands for "not measured"
        fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=100)
        names = [_label(row.config, keys) for row, _ in measured]
        values = [v for _, v in measured]
        ax.bar(range(len(values)), [np.mean(v) for v in values],
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values], capsize=3)
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("configuration")
        ax.set_ylabel("final λ_max (mean ± std over seeds)")
        ax.set_title(SHARPNESS_TITLE, fontsize=10)
        fig.tight_layout()
        fig.savefig(directory / "sharpness.png")
        plt.close(fig)
        written.append("sharpness.png")
    if metric_curves(rows, keys, "client_drift", directory / "drift.png",
                     f"client drift {DRIFT_RATIO} (mean over seeds)", DRIFT_TITLE):
        written.append("drift.png")
    if metric_curves(rows, keys, "correction_norm", directory / "correction.png",
                     "correction-state L2 norm (mean over seeds)", CORRECTION_TITLE):
        written.append("correction.png")
    return written
