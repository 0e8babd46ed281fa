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
