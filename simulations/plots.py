"""PNG figures: the label heatmap of a split, accuracy curves, the heterogeneity plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
