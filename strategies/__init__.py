"""Server strategies on Flower's message API: FedAvg, FedSAM, MoFedSAM, FedAvgM."""

from .fedavg import FedAvg, SeededRounds
from .fedavgm import FedAvgM
from .fedsam import FedSAM
from .mofedsam import MoFedSAM
from .sampling import ClientSampler, NodeSetupError, query_partition_ids

__all__ = ["ClientSampler", "NodeSetupError", "FedAvg", "FedAvgM", "FedSAM", "MoFedSAM", "SeededRounds", "query_partition_ids"]
