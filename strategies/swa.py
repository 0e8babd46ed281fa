"""Server-side SWA (Caldarola et al., ECCV 2022: FedSAM+SWA, FedASAM+SWA), for any strategy.

The clients and the aggregation are unchanged; from round ``start`` on, the server keeps a running
average of global models and evaluates it, and, with cycles longer than one round, the clients'
lr follows a cyclic schedule. Rounds are numbered from 1, as ``fedsam run`` shows them; the
family specification (section 14) counts from 0, so its ``t`` is ``round − 1``:

    round < start:   clients use η_1; no SWA model
    round = start:   w_SWA ← the global model before this round; n ← 0
    round ≥ start:   clients use (1 − τ)·η_1 + τ·η_2, τ = (((round − 1) mod c) + 1)/c   (c = 1: η_1)
    after round r > start with (r − start) mod c = 0:
                     w_SWA ← w_SWA + (w_{r+1} − w_SWA)/(n + 1);  n ← n + 1

so after ``k`` collections ``w_SWA`` is the mean of the ``k`` collected models (the first one
replaces the copy taken at ``start``). That is the reference code's rule: with ``start − 1`` (the
spec's ``t_s``) a multiple of ``c``, as in every published run, it collects the model of each
cycle's *first*, highest-lr round. ``collect="end-of-cycle"`` collects after the rounds
``r ≥ start`` with ``(r − 1) mod c = c − 1`` instead (with ``c = 1``: every round from ``start``
on): each cycle's last, lowest-lr round (``τ = 1``), the models Izmailov et al.'s SWA averages.
``η_1`` is the run's own lr for the round (decay included). A ``start`` after the last round never
begins: the run is the run without SWA.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

#: Which rounds' models SWA averages (see the module's docstring): the reference code's, or each
#: cycle's lowest-lr one.
SWA_COLLECT = ("reference", "end-of-cycle")  # the first is the default


class SWA:
    """The SWA schedule and the averaged model.

    Parameters
    ----------
    start : int
        The first round whose starting global model is copied (1-based); from then on evaluation
        uses the SWA model.
    cycle : int (default: 1)
        ``c``: collect every ``c`` rounds; with ``c > 1`` the clients' lr cycles from ``η_1``
        towards ``lr``.
    lr : float (default: 1e-4)
        ``η_2``, the lowest lr of a cycle (unused when ``c = 1``).
    collect : str (default: "reference")
        Which rounds' models are averaged, one of ``SWA_COLLECT``.
    """

    def __init__(self, start: int, cycle: int = 1, lr: float = 1e-4, collect: str = SWA_COLLECT[0]) -> None:
        if start < 1:
            raise ValueError(f"swa start must be a round >= 1, got {start}")
        if cycle < 1:
            raise ValueError(f"swa cycle must be >= 1, got {cycle}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"swa lr must be > 0, got {lr}")
        if collect not in SWA_COLLECT:
            raise ValueError(f"swa collect must be one of {SWA_COLLECT}, got {collect!r}")
        self.start, self.cycle, self.lr, self.collect = start, cycle, lr, collect
        self.model: dict[str, np.ndarray] | None = None  # w_SWA, float64
        self.dtypes: dict[str, np.dtype] = {}
        self.collected = 0  # n

    def client_lr(self, server_round: int, lr: float) -> float:
        """The clients' lr of this round, given the run's own ``η_1``."""
        if server_round < self.start or self.cycle == 1:
            return lr
        tau = (((server_round - 1) % self.cycle) + 1) / self.cycle
        return (1 - tau) * lr + tau * self.lr

    def begin_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """At ``start``: copy the global model the round starts from."""
        if server_round == self.start and self.model is None:
            self.model = {k: a.numpy().astype(np.float64) for k, a in arrays.items()}
            self.dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
            self.collected = 0

    def collects_after(self, server_round: int) -> bool:
        """Whether the global model this round produces joins the average."""
        if self.collect == "end-of-cycle":
            return server_round >= self.start and (server_round - 1) % self.cycle == self.cycle - 1
        return server_round > self.start and (server_round - self.start) % self.cycle == 0

    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """After a collecting round: fold the new global model into the mean."""
        if self.model is None or not self.collects_after(server_round):
            return
        n = self.collected
        for k, a in arrays.items():
            self.model[k] = self.model[k] + (a.numpy().astype(np.float64) - self.model[k]) / (n + 1)
        self.collected = n + 1

    @property
    def active(self) -> bool:
        return self.model is not None

    def arrays(self) -> ArrayRecord:
        """``w_SWA`` in the model's dtypes."""
        assert self.model is not None
        return ArrayRecord({k: Array(np.asarray(v.astype(self.dtypes[k]))) for k, v in self.model.items()})

    def state(self) -> dict[str, Any]:
        return {"model": None if self.model is None else {k: torch.from_numpy(v) for k, v in self.model.items()},
                "dtypes": {k: str(d) for k, d in self.dtypes.items()}, "collected": self.collected}

    def restore(self, state: dict[str, Any]) -> None:
        model = state.get("model")
        self.model = None if model is None else {k: t.numpy().astype(np.float64) for k, t in model.items()}
        self.dtypes = {k: np.dtype(d) for k, d in state.get("dtypes", {}).items()}
        self.collected = int(state.get("collected", 0))
