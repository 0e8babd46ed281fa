"""MoFedSAM (Qu et al. ICML 2022): FedCM with SAM gradients.

The client's descent direction is ``d = α · g_sam + (1 − α) · m_t`` (ε from the unmixed
gradient), the server is FedCM's (``fedcm.py``): FedAvg, then
``m_{t+1} = Σ_i n_i · (−Δ_i) / (K · η_t) / Σ_i n_i``, sent as the ``"momentum"`` ArrayRecord.
"""

from __future__ import annotations

from fedsam.optim import FEDERATED_RHO

from .fedcm import FedCM
from .fedsam import ClientDefaults
from .swa import SWA


class MoFedSAM(ClientDefaults, FedCM):
    """FedCM whose clients default to SAM.

    Parameters
    ----------
    num_clients, clients_per_round, seed, sampling, server_lr, lr_decay, query_timeout, workers, relaxed_init, swa
        As in ``FedAvg``.
    alpha, parameter_keys, first_round_alpha, fixed_steps
        As in ``FedCM``.
    client_optimizer, rho
        As in ``FedSAM``: SAM with ρ = 0.1 unless the train config names an optimizer.
    """

    def __init__(self, num_clients: int, clients_per_round: int, *, seed: int = 0, sampling: str = "uniform",
                 server_lr: float = 1.0, lr_decay: float = 1.0, query_timeout: float = 600.0,
                 workers: int | None = None, relaxed_init: float = 0.0, swa: SWA | None = None, alpha: float = 0.1, parameter_keys: list[str] | None = None,
                 first_round_alpha: str = "one", fixed_steps: float | None = None,
                 client_optimizer: str = "sam", rho: float = FEDERATED_RHO) -> None:
        super().__init__(num_clients, clients_per_round, seed=seed, sampling=sampling, server_lr=server_lr,
                         lr_decay=lr_decay, query_timeout=query_timeout, workers=workers, relaxed_init=relaxed_init, swa=swa, alpha=alpha,
                         parameter_keys=parameter_keys, first_round_alpha=first_round_alpha,
                         fixed_steps=fixed_steps)
        self.client_optimizer, self.rho = client_optimizer, rho
