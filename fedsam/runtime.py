"""Where and how training runs: the device, its precision, and per-client randomness.

The server (evaluation, the bench, sharpness) and the clients both import this module, so the
server never imports the ClientApp, and both sides make the same choices.
"""

from __future__ import annotations

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
