"""Small CIFAR-shaped datasets in the standard python layouts, for tests, smoke runs and benchmarks.

The images are learnable but not natural: each class has its own mean colour and a bright or
dark square in a class-specific corner, plus noise."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _images(labels: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """Each class has its own mean colour and a bright square in a class-specific corner, plus noise,
    so a small CNN learns it in a few steps."""
    n = len(labels)
    colours = np.random.default_rng(1234).integers(40, 216, size=(num_classes, 3))
    images = rng.normal(0, 30, size=(n, 3, 32, 32)) + colours[labels][:, :, None, None]
    for i, y in enumerate(labels):
        r, c = divmod(int(y) % 4, 2)
        images[i, :, r * 16:(r * 16) + 12, c * 16:(c * 16) + 12] += 60 if y % 2 else -60
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_cifar10(root: str | Path, per_batch: int = 200, test: int = 200, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` with 5 training batches of ``per_batch`` images (balanced classes)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for b in range(1, 6):
        labels = rng.permutation(np.arange(per_batch) % 10)
        _dump(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": labels.tolist(),
                                          "data": _images(labels, rng, 10), "filenames": [f"{i}.png" for i in labels]})
    labels = rng.permutation(np.arange(test) % 10)
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
                                  "data": _images(labels, rng, 10), "filenames": [f"{i}.png" for i in labels]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return Path(root)


def write_cifar100(root: str | Path, train: int = 1000, test: int = 200, seed: int = 0) -> Path:
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", train), ("test", test)):
        fine = rng.permutation(np.arange(n) % 100)
        _dump(folder / name, {"filenames": [f"{i}.png" for i in fine], "batch_label": name,
                              "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                              "data": _images(fine, rng, 100)})
    _dump(folder / "meta", {"fine_label_names": [f"class_{i}" for i in range(100)],
                            "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return Path(root)


def _dump(path: Path, content: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f)
