"""CIFAR-10 and CIFAR-100 read straight from their standard python layouts, as uint8 tensors.

The files are pickles of ``{"data": uint8 N×3072, "labels" | "fine_labels": [...]}`` under
``cifar-10-batches-py/`` or ``cifar-100-python/``. Reading them directly (instead of through
torchvision's dataset classes) avoids their MD5 check, so subsets in the same layout load too,
and avoids PIL: the images come back as one ``N×3×32×32`` tensor ready to move to a device.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


class DataError(Exception):
    """Data that is missing or unreadable; the message says where we looked and what to do."""


@dataclass(frozen=True)
class Layout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


LAYOUTS = {
    "cifar10": Layout(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "batches.meta", "labels", "label_names", 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10",
    ),
    "cifar100": Layout(
        "CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100",
    ),
}
DATASETS = tuple(LAYOUTS)


@dataclass(frozen=True)
class ImageDataset:
    """A whole dataset in memory: ``uint8`` images ``N×3×32×32`` and ``int64`` labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _folder(layout: Layout, data_dir: Path) -> Path:
    """``data_dir/<folder>``, or ``data_dir`` itself when it already is that folder."""
    if (data_dir / layout.test_file).is_file() and not (data_dir / layout.folder).is_dir():
        return data_dir
    return data_dir / layout.folder


def _missing(layout: Layout, folder: Path) -> list[str]:
    wanted = (*layout.train_files, layout.test_file, layout.meta_file)
    return [name for name in wanted if not (folder / name).is_file()]


# What a CIFAR batch pickle may name: a numpy array's reconstruction (numpy 1 and numpy 2 module
# names), and the bytes helper Python 3 writes at pickle protocol 2. Anything else in such a file
# can only be an attempt to run code.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _Refused(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a run folder's data-dir may come from anyone."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise _Refused(f"refused global {module}.{name}")
        if name == "_reconstruct":  # either module name, resolved for the numpy installed
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return super().find_class(module, name)


def read_pickle(path: Path, title: str) -> dict:
    """One file of the CIFAR python layout, as data only (``_BatchUnpickler``); a one-line
    ``DataError`` for anything else."""
    try:
        with open(path, "rb") as f:
            content = _BatchUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise DataError(f"unsafe {title} file {path}: {exc} (these files hold only arrays, lists and strings)") from None
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise DataError(f"corrupt {title} file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(content, dict):
        raise DataError(f"corrupt {title} file {path}: expected a pickled dict, found {type(content).__name__}")
    return content


def _read_split(layout: Layout, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        content = read_pickle(path, layout.title)
        data, y = content.get("data"), content.get(layout.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"corrupt {layout.title} file {path}: 'data' must be a uint8 array of shape N×3072")
        if y is None or len(y) != len(data):
            raise DataError(f"corrupt {layout.title} file {path}: '{layout.label_key}' must list one label per image")
        y = np.asarray(y, dtype=np.int64)
        if len(y) and (y.min() < 0 or y.max() >= layout.num_classes):
            raise DataError(f"corrupt {layout.title} file {path}: labels outside 0..{layout.num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _download(layout: Layout, data_dir: Path) -> None:
    import torchvision.datasets  # only here: the download is the one thing torchvision does for us

    data_dir.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(torchvision.datasets, layout.torchvision_class)
    try:
        dataset_class(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - network, disk, checksum: all reported the same way
        raise DataError(f"could not download {layout.title} into {data_dir}: {type(exc).__name__}: {exc}") from exc


def _refuse_the_other_dataset(layout: Layout, data_dir: Path) -> None:
    """A data-dir that holds CIFAR-100 when CIFAR-10 was asked for (or the reverse) is a wrong
    --dataset or --data-dir, not missing data: say which folder was found instead."""
    for name, other in LAYOUTS.items():
        found = _folder(other, data_dir)
        if other is not layout and (found / other.test_file).is_file():
            raise DataError(f"{layout.title} not found: --data-dir {data_dir} holds {other.title} ({found}), not "
                            f"{layout.title}; pass --dataset {name} to use it, or point "
                            f"--data-dir at the folder that holds {layout.folder}/")


def load(name: str, data_dir: str | Path, download: bool = False) -> ImageDataset:
    """Load ``cifar10`` or ``cifar100`` (fine labels) from ``data_dir``, downloading it if allowed."""
    if name not in LAYOUTS:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    layout = LAYOUTS[name]
    data_dir = Path(data_dir).expanduser()
    folder = _folder(layout, data_dir)
    missing = _missing(layout, folder)
    if missing and download:
        _download(layout, data_dir)
        folder = data_dir / layout.folder
        missing = _missing(layout, folder)
    if missing:
        if not folder.is_dir():
            _refuse_the_other_dataset(layout, data_dir)
        raise DataError(
            f"{layout.title} not found: {folder} lacks {', '.join(missing)}; pass --download to fetch it "
            f"with torchvision, or point --data-dir at the folder that holds {layout.folder}/"
        )
    train_images, train_labels = _read_split(layout, [folder / f for f in layout.train_files])
    test_images, test_labels = _read_split(layout, [folder / layout.test_file])
    meta = read_pickle(folder / layout.meta_file, layout.title)
    classes = meta.get(layout.names_key)
    if not isinstance(classes, list) or len(classes) != layout.num_classes:
        raise DataError(f"corrupt {layout.title} file {folder / layout.meta_file}: "
                        f"'{layout.names_key}' must list {layout.num_classes} class names")
    return ImageDataset(name, train_images, train_labels, test_images, test_labels,
                        [str(c) for c in classes], layout.mean, layout.std)
