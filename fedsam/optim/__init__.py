"""Local optimizers: SGD, SAM, ASAM, multi-step FGSM SAM, FedSMOO's dual SAM, Sparse SAM, and the plug-in point for your own."""

from .base import PerturbThenDescend, check_rho
from .dual_sam import DualSAM
from .batchnorm import FirstPassStats, batchnorm_layers, frozen_running_stats
from .fgsm import FGSMSAM, l2_equivalent_rho
from .gf_sam import GlobalFlatSAM
from .lesam import FixedPerturbation
from .registry import (BUILTIN, FEDERATED_RHO, FEDGF_RHO, SPARSE_SAM, OptimizerSpecError, build, names, portable_spec,
                       register, resolve, restart, unregister)
from .sam import ASAM_SCOPE, ASAM_SCOPES, SAM, asam_param_groups, asam_scaled
from .ssam import SSAM_MODES, SSAM_NORMS, SSAM_SCORES, SparseSAM

__all__ = [
    "ASAM_SCOPE",
    "ASAM_SCOPES",
    "BUILTIN",
    "DualSAM",
    "FEDERATED_RHO",
    "FEDGF_RHO",
    "FGSMSAM",
    "FirstPassStats",
    "FixedPerturbation",
    "GlobalFlatSAM",
    "OptimizerSpecError",
    "PerturbThenDescend",
    "SAM",
    "SSAM_MODES",
    "SSAM_NORMS",
    "SSAM_SCORES",
    "SPARSE_SAM",
    "SparseSAM",
    "asam_param_groups",
    "asam_scaled",
    "batchnorm_layers",
    "build",
    "check_rho",
    "frozen_running_stats",
    "l2_equivalent_rho",
    "names",
    "portable_spec",
    "register",
    "resolve",
    "restart",
    "unregister",
]
