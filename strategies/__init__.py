"""Server strategies on Flower's message API: FedAvg and FedSAM, the drift-correcting methods
(FedProx, FedCM, SCAFFOLD, FedDyn, FedAdam, FedAvgM) and their SAM variants (MoFedSAM, FedGAMMA,
FedSpeed, FedSMOO), the global-perturbation methods (FedLESAM and its -S and -D variants, FedGF,
FedGloSS), and
server-side SWA for any of them."""

from .fedadam import FedAdam
from .fedavg import ClientUpdate, FedAvg, RoundReport, SeededRounds
from .fedavgm import FedAvgM
from .fedcm import FedCM
from .fedgf import FedGF
from .fedgloss import FedGloSS
from .fedlesam import FedLESAM, FedLESAMD, FedLESAMS
from .feddyn import FedDyn, FedSMOO, FedSpeed
from .fedprox import FedProx
from .fedsam import FedSAM
from .mofedsam import MoFedSAM
from .sampling import ClientSampler, NodeSetupError, query_partition_ids
from .scaffold import FedGAMMA, Scaffold
from .swa import SWA

__all__ = ["ClientSampler", "ClientUpdate", "FedAdam", "FedAvg", "FedAvgM", "FedCM", "FedDyn", "FedGAMMA",
           "FedGF", "FedGloSS", "FedLESAM", "FedLESAMD", "FedLESAMS", "FedProx", "FedSAM", "FedSMOO", "FedSpeed", "MoFedSAM",
           "NodeSetupError", "RoundReport", "SWA", "Scaffold", "SeededRounds", "query_partition_ids"]
