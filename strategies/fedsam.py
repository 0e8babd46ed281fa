"""FedSAM (Qu et al. ICML 2022; Caldarola et al. ECCV 2022): FedAvg's server, SAM on the clients.

The server math is FedAvg's; what makes it FedSAM is the local optimizer. This class sends
``optimizer = "sam"`` with ``rho = 0.1`` (the federated papers' radius) unless the train config
names an optimizer already, so ``FedSAM(...).start(...)`` is FedSAM with no further setup.
``ClientDefaults`` does the same for every SAM variant (MoFedSAM, FedGAMMA, FedSpeed, FedSMOO).
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from fedsam.optim import FEDERATED_RHO

from .fedavg import FedAvg
from .swa import SWA


class ClientDefaults:
    """Sends the method's client optimizer and ρ when the train config names no optimizer."""

    client_optimizer: str | None = None
    rho: float | None = None

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)  # type: ignore[misc]
        if self.client_optimizer is not None and "optimizer" not in out:
            out["optimizer"] = self.client_optimizer
            if self.rho is not None:
                out.setdefault("rho", self.rho)
        return out


class FedSAM(ClientDefaults, FedAvg):
    """FedAvg whose clients default to SAM.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    client_optimizer : str (default: "sam")
        The optimizer spec sent to clients when the train config names none.
    rho : float (default: 0.1)
        The perturbation radius sent with it, the federated SAM papers' value.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None, client_optimizer: str = "sam", rho: float = FEDERATED_RHO) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa)
        self.client_optimizer, self.rho = client_optimizer, rho
