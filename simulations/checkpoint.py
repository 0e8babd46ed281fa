"""Checkpoints: everything a run needs to continue as if it had never stopped.

``checkpoint.pt`` in the run folder holds the last completed round, the global model, the
strategy's state (MoFedSAM's momentum, FedAvgM's velocity), the metrics so far, the config and
the server's torch RNG state. Client sampling, each client's shuffling and augmentation, the
local-lr schedule and the sharpness probe all draw from generators keyed by (seed, round,
client), so the round number restores them; no RNG stream needs saving for them.

Writes go to ``checkpoint.pt.tmp``, are flushed to disk, then renamed over ``checkpoint.pt``:
a checkpoint is either the old one or the new one, never half of one. Reading uses
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from simulations.results import CHECKPOINT

FILE = CHECKPOINT
VERSION = 1
KEYS = ("version", "round", "config", "arrays", "strategy", "records", "torch_rng")


class CheckpointError(Exception):
    """No checkpoint, or one that cannot be used; the message says which."""


def save(out: Path, state: dict[str, Any]) -> None:
    tmp = out / (FILE + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"version": VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / FILE)
    directory = os.open(out, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(out: Path) -> dict[str, Any]:
    path = out / FILE
    if not path.is_file():
        raise CheckpointError(f"{out} has no checkpoint ({FILE}); nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for whatever reason: one line
        raise CheckpointError(f"{path} is not a readable checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or any(k not in state for k in KEYS):
        raise CheckpointError(f"{path} is not a fedsam checkpoint")
    if state["version"] != VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['version']}; this fedsam reads {VERSION}")
    return state
