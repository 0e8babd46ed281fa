"""FedSAM (Qu et al. ICML 2022; Caldarola et al. ECCV 2022): FedAvg's server, SAM on the clients.

The server math is FedAvg's; what makes it FedSAM is the local optimizer. This class sends
``optimizer = "sam"`` with ``rho = 0.1`` (the federated papers' radius) unless the train config
names an optimizer already, so ``FedSAM(...).start(...)`` is FedSAM with no further setup.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from .fedavg import FedAvg

FEDERATED_RHO = 0.1


def with_sam_defaults(config: ConfigRecord, optimizer: str, rho: float) -> ConfigRecord:
    if "optimizer" not in config:
        config["optimizer"] = optimizer
        config.setdefault("rho", rho)
    return config


class FedSAM(FedAvg):
    """FedAvg whose clients default to SAM (``client_optimizer``, ``rho``)."""

    def __init__(self, *args, client_optimizer: str = "sam", rho: float = FEDERATED_RHO, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.client_optimizer, self.rho = client_optimizer, rho

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        return with_sam_defaults(super().round_config(server_round, config), self.client_optimizer, self.rho)
