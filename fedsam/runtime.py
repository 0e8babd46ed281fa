"""Where and how training runs: the device, its precision, per-client randomness, and the
allocator of a process that trains or evaluates (``keep_freed_memory``).

The server (evaluation, the bench, sharpness) and the clients both import this module, so the
server never imports the ClientApp, and both sides make the same choices.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when one is visible, else the CPU; ``cuda`` without one is an error."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible to this process")
    return torch.device("cuda")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs by default: forward passes in bf16, weights, gradients and SAM's
    perturbation (its norm included) in float32. ``fp32`` turns it off; CPUs default to float32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on GPUs, what cuDNN's fastest convolutions want; the default layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask (``taskset``, a SLURM or container
    allocation), not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def eval_batch_size(device: torch.device) -> int:
    """Test-set batches: 1,000 images on a GPU, where fewer launches pay; 128 on a CPU, where small
    batches stay in cache and the CNN's activations stay below ``keep_freed_memory``'s mmap
    threshold. On 2 cores 128 was as fast as 64 and faster than 256 to 1,000, for the CNN and for
    ResNet-18 (docs/performance.md)."""
    return 1000 if device.type == "cuda" else 128


def use_cuda_graphs(setting: str, device: torch.device) -> bool:
    """``auto``: on for GPUs. On the H200 graphs made a ResNet-18 client step 1.2–3.7x faster and
    cost a few percent where a client has too few full batches to reach its capture
    (docs/performance.md); CPUs have no graphs."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda-graphs must be auto, on or off, got {setting!r}")
    return device.type == "cuda" and setting != "off"


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Independent, reproducible randomness per (run seed, round, client), whatever process runs it."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
               "GLIBC_TUNABLES")


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Stop glibc handing a training step's freed activations back to the OS, only to fault them
    in again on the next step (CPU training; on a GPU the caching allocator already keeps them).

    glibc serves a block of up to its mmap threshold from the heap, and gives the heap's free top
    back to the kernel once it passes the trim threshold. Both start small and grow only after a
    large block is freed, so they depend on the process's history: in a Ray worker that only
    trains, each CNN step's few-MB activations were trimmed and faulted in again (~190 page faults
    per image), where a process that also evaluates on the test set had long raised them. Fixed
    values make every process behave the same. A no-op off glibc, or where the user tunes malloc
    through the environment. Returns whether it applied."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
