"""Minibatches straight from a uint8 tensor on the training device, augmented in batches.

The usual Flower quickstart feeds a DataLoader whose workers crop, flip and normalise one PIL
image at a time. Here a client's images sit on the training device as one tensor; each epoch
draws one permutation and one crop offset and flip per sample from a seeded generator, and each
batch is a single gather (crop and flip folded into the gather's indices) plus one fused
normalisation. Nothing runs per image in Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

PAD = 4  # RandomCrop(32, padding=4), zero padding, as in the CIFAR literature


class DeviceBatches:
    """Iterate ``(images, labels)`` minibatches of one client's data, epoch after epoch.

    ``images`` is ``uint8 N×3×H×W`` and ``labels`` ``int64 N``, both already on the training
    device. With ``augment`` each sample gets a random crop (pad 4) and horizontal flip; with
    ``shuffle`` each epoch visits the samples in a new order. Both come from one CPU generator
    seeded with ``seed``, so the sequence of batches is reproducible and the same on every device;
    an epoch's draws then reach the device in one copy (a CUDA generator per client costs more
    to set up than a small client's whole epoch). The last batch of an epoch may be smaller, down
    to one sample, so an epoch is ``⌈n/b⌉`` steps as the specification counts them; with
    ``fold_lone_last`` a last batch of a single sample is folded into the one before it instead,
    for BatchNorm models (BatchNorm cannot train on one sample).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
        fold_lone_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 N×C×H×W tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"need as many labels as images, and at least one: {len(images)} vs {len(labels)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = images.device
        self.images = images
        self.labels = labels
        self.augment = augment
        self.shuffle = shuffle
        self.dtype = dtype
        self.memory_format = memory_format
        self.scale, self.shift = normalisation(tuple(mean), tuple(std), self.device, dtype)
        self.generator = torch.Generator().manual_seed(seed)
        if augment:
            self.padded = F.pad(images, (PAD, PAD, PAD, PAD))
            self.grid = pixel_grid(images)
        n = len(images)
        starts = list(range(0, n, batch_size)) + [n]
        if fold_lone_last and len(starts) > 2 and starts[-1] - starts[-2] == 1:
            del starts[-2]
        self.bounds = list(zip(starts[:-1], starts[1:]))

    def __len__(self) -> int:
        """Minibatches per epoch."""
        return len(self.bounds)

    def draw_epoch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One epoch's random draws, on the CPU: the visiting order, and each position's crop
        offset and flip. ``fedsam.cohort`` draws a client's epochs through this too, so a client
        batched with others sees exactly the batches it would see alone."""
        n = len(self.images)
        g = self.generator
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if not self.augment:
            return order, None, None
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        return order, offsets, flips

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``draw_epoch``'s tensors on the training device, moved in one copy."""
        order, offsets, flips = self.draw_epoch()
        if offsets is None:
            return to_device(order, self.device), None, None
        n = len(order)
        moved = to_device(torch.cat([order, offsets.flatten(), flips.long()]), self.device)
        return moved[:n], moved[n:3 * n].view(n, 2), moved[3 * n:].bool()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self.epoch_plan()
        for start, stop in self.bounds:
            idx = order[start:stop]
            if self.augment:
                x = crop_and_flip(self.padded, self.grid, idx, offsets[start:stop], flips[start:stop])
            else:
                x = self.images[idx]
            x = x.to(self.dtype).mul_(self.scale).sub_(self.shift)
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]


class SingleExamples:
    """Single training examples, one epoch of a client's own seeded stream after another
    (SSAM-F's Fisher examples): ``take(k)`` continues where the last call stopped, reshuffling
    when an epoch runs out. ``batches`` gives the data, transforms and generator; its batch size
    does not matter (its ``fold_lone_last`` is not used here)."""

    def __init__(self, batches: DeviceBatches) -> None:
        self.batches = batches
        self.plan: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self.position = 0

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``count`` examples, transformed and normalised: ``count×C×H×W`` and ``count``."""
        source = self.batches
        pieces = []
        while count > 0:
            if self.plan is None or self.position == len(self.plan[0]):
                self.plan, self.position = source.epoch_plan(), 0
            stop = min(self.position + count, len(self.plan[0]))
            pieces.append([t[self.position:stop] if t is not None else None for t in self.plan])
            count -= stop - self.position
            self.position = stop
        idx = torch.cat([order for order, _, _ in pieces])
        if source.augment:
            x = crop_and_flip(source.padded, source.grid, idx, torch.cat([o for _, o, _ in pieces]),
                              torch.cat([f for _, _, f in pieces]))
        else:
            x = source.images[idx]
        x = x.to(source.dtype).mul_(source.scale).sub_(source.shift)
        return x.contiguous(memory_format=source.memory_format), source.labels[idx]



def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without making the host wait for the GPU's queue (pinned memory,
    asynchronous copy); the pinned allocator keeps the buffer until the copy has run."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@lru_cache(maxsize=16)
def normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x/255 − mean) / std = x·scale − shift``: the two constants, made once per device and dtype."""
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, len(std), 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, len(mean), 1, 1)
    return (1.0 / (255.0 * std_t)).to(dtype), (mean_t / std_t).to(dtype)


def pixel_grid(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column numbers of an image, made once per tensor of images, not per batch."""
    height, width = images.shape[-2:]
    return torch.arange(height, device=images.device), torch.arange(width, device=images.device)


def crop_and_flip(padded: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor,
                  offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """One gather from zero-padded images: row ``dy + r`` and column ``dx + c`` (``dx + W−1−c`` when
    flipped) of image ``idx``. ``idx`` may have any shape; the result is ``idx.shape × C×H×W``."""
    rows_base, cols_base = grid
    rows = offsets[..., :1] + rows_base  # …×H
    cols = torch.where(flips[..., None], cols_base.flip(0), cols_base) + offsets[..., 1:]  # …×W
    patches = padded[idx[..., None, None], :, rows[..., :, None], cols[..., None, :]]  # …×H×W×C
    return patches.movedim(-1, -3)
