"""FedProx (Li et al., MLSys 2020) in FL-Simulator's form (algorithms-family.md, section 1).

The paper adds ``(μ/2)‖w − w_{i,0}‖²`` to each client's loss. FL-Simulator, whose numbers a
study compares against, writes the pull as ``−μ·w_{i,0}`` inside the clipped direction and
``+μ·w`` as extra weight decay:

    reference:  w ← w − η·( clip(g − μ·w_{i,0}) + (wd + μ)·w )
    paper:      w ← w − η·( clip(g + μ·(w − w_{i,0})) + wd·w )

The two agree without clipping. ``prox_clip`` picks one (``fedsam.train``: ``anchor-pull = μ``,
plus ``extra-weight-decay = μ`` or ``direction-decay = μ``). The server is FedAvg's. Flower's own
FedProx sends μ for the client's loss and leaves the clipping to it, so it is not reused here:
the rule has to be the same on every client, batched or not.
"""

from __future__ import annotations

import math

from flwr.app import ConfigRecord

from .fedavg import FedAvg
from .swa import SWA

PROX_MU = 0.1  # FL-Simulator's --lamb
PROX_CLIP = ("reference", "paper")


class FedProx(FedAvg):
    """FedAvg whose clients are pulled towards the global model.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    mu : float (default: 0.1)
        The proximal weight ``μ``; ``>= 0``, and ``0`` is FedAvg.
    prox_clip : str (default: "reference")
        ``"reference"`` clips ``g − μ·w_{i,0}`` (FL-Simulator); ``"paper"`` clips ``g + μ(w − w_{i,0})``.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None, mu: float = PROX_MU, prox_clip: str = "reference") -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa)
        if not (mu >= 0 and math.isfinite(mu)):
            raise ValueError(f"mu must be >= 0, got {mu}")
        if prox_clip not in PROX_CLIP:
            raise ValueError(f"prox_clip must be one of {PROX_CLIP}, got {prox_clip!r}")
        self.mu, self.prox_clip = mu, prox_clip

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)
        if self.mu != 0:
            out["anchor-pull"] = self.mu
            out["extra-weight-decay" if self.prox_clip == "reference" else "direction-decay"] = self.mu
        return out
