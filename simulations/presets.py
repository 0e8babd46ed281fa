"""Named settings from the literature; any flag given on the command line overrides them.

A preset's ``"methods"`` table holds the settings of one strategy: they apply when the run's
strategy (the preset's own, or ``--strategy``) is that one.
"""

PRESETS: dict[str, dict] = {
    # A first run: minutes on a laptop CPU, and SAM's effect already visible in the curves.
    "quickstart": {
        "dataset": "cifar10", "model": "cnn", "partition": "dirichlet", "dirichlet-alpha": 0.3,
        "num-clients": 10, "clients-per-round": 5, "rounds": 30, "local-epochs": 2, "batch-size": 32,
        "strategy": "fedsam", "optimizer": "sam", "rho": 0.1, "lr": 0.05, "momentum": 0.0,
        "weight-decay": 4e-4, "eval-every": 1,
    },
    # FL-Simulator's setting (woodenchild95/FL-Simulator, its README table and train.py): ResNet-18
    # with the ImageNet stem and GroupNorm(2), 100 clients, Bernoulli(0.1) participation, 5 epochs,
    # batch 50, plain SGD with weight decay 1e-3, lr 0.1 decayed 0.998 a round, every direction
    # clipped at 10, and the reference's conventions (round 1 mixed with α, K̂ = E·n_0/b). MoFedSAM
    # by default; "methods" holds each method's own row, used when --strategy names it.
    "fl-simulator-cifar10": {
        "dataset": "cifar10", "model": "resnet18-fls", "partition": "dirichlet-equal", "dirichlet-alpha": 0.3,
        "num-clients": 100, "clients-per-round": 10, "client-sampling": "bernoulli", "rounds": 1000,
        "local-epochs": 5, "batch-size": 50, "strategy": "mofedsam", "lr": 0.1, "lr-decay": 0.998,
        "weight-decay": 1e-3, "momentum": 0.0, "grad-clip": 10.0, "eval-every": 10,
        "methods": {
            "fedavg": {"server-lr": 1.0},
            "fedsam": {"server-lr": 1.0, "rho": 0.1},
            "fedprox": {"prox-mu": 0.1, "prox-clip": "reference"},
            "fedcm": {"momentum-alpha": 0.1, "first-round-alpha": "alpha", "step-normaliser": "fl-simulator"},
            "mofedsam": {"optimizer": "sam", "rho": 0.1, "momentum-alpha": 0.1, "first-round-alpha": "alpha",
                         "step-normaliser": "fl-simulator", "server-lr": 1.0},
            "scaffold": {"server-lr": 1.0, "step-normaliser": "fl-simulator"},
            "fedgamma": {"server-lr": 1.0, "rho": 0.01, "step-normaliser": "fl-simulator"},
            "feddyn": {"dyn-lambda": 0.1, "lr-decay": 0.9995},
            "fedadam": {"server-lr": 0.1, "adam-beta1": 0.9, "adam-beta2": 0.99, "adam-tau": 0.01, "adam-v0": "zero"},
            "fedspeed": {"rho": 0.1, "dyn-lambda": 0.1},
            "fedsmoo": {"rho": 0.1, "dyn-lambda": 0.1},
        },
    },
    # Caldarola et al. (ECCV 2022, debcaldarola/fedsam): LeNet-style CNN, 100 clients x 500 images
    # with Dirichlet class priors, 5 clients per round, 1 epoch, batch 64, 10,000 rounds.
    "caldarola-cifar10": {
        "dataset": "cifar10", "model": "cnn", "partition": "dirichlet-equal", "dirichlet-alpha": 0.05,
        "num-clients": 100, "clients-per-round": 5, "rounds": 10000, "local-epochs": 1, "batch-size": 64,
        "strategy": "fedsam", "optimizer": "sam", "rho": 0.1, "lr": 0.01, "momentum": 0.0,
        "weight-decay": 4e-4, "eval-every": 100,
    },
    # Caldarola et al.'s FedSAM+SWA: the same, with server-side SWA over the last quarter (the copy
    # taken before round 7501, i.e. their t_s = 7500 counted from 0), cycles of 10 rounds from
    # lr 0.01 down to 1e-4. FedASAM+SWA: add --optimizer asam --rho 0.7 --eta 0.2; FedAvg+SWA:
    # --strategy fedavg --optimizer sgd.
    "caldarola-cifar10-swa": {
        "dataset": "cifar10", "model": "cnn", "partition": "dirichlet-equal", "dirichlet-alpha": 0.05,
        "num-clients": 100, "clients-per-round": 5, "rounds": 10000, "local-epochs": 1, "batch-size": 64,
        "strategy": "fedsam", "optimizer": "sam", "rho": 0.1, "lr": 0.01, "momentum": 0.0,
        "weight-decay": 4e-4, "eval-every": 100,
        "swa-start": 7501, "swa-cycle": 10, "swa-lr": 1e-4,
    },
    # FedLESAM (Fan et al., ICML 2024; its train.py, a fork of FL-Simulator): ResNet-18-GN, 200
    # clients of equal size with Dirichlet(0.1) priors, 5% Bernoulli participation, 5 epochs at batch
    # 25, lr 0.1 × 0.998, weight decay 1e-3, clipping at 10, ρ = 0.1, 1000 rounds. The -S row uses
    # the reference's correction weight 0.1.
    "fedlesam-cifar10": {
        "dataset": "cifar10", "model": "resnet18-fls", "partition": "dirichlet-equal", "dirichlet-alpha": 0.1,
        "num-clients": 200, "clients-per-round": 10, "client-sampling": "bernoulli", "rounds": 1000,
        "local-epochs": 5, "batch-size": 25, "strategy": "fedlesam", "lr": 0.1, "lr-decay": 0.998,
        "weight-decay": 1e-3, "momentum": 0.0, "grad-clip": 10.0, "eval-every": 10,
        "methods": {
            "fedlesam": {"rho": 0.1},
            "fedlesam-s": {"rho": 0.1, "lesam-correction": 0.1, "step-normaliser": "fl-simulator"},
            "fedlesam-d": {"rho": 0.1, "dyn-lambda": 0.1},
        },
    },
    # FedGF (Lee & Yoon, ICML 2024; tools/experiments/cifar.sh): Caldarola et al.'s CNN and split,
    # 5 of 100 clients, 1 epoch at batch 64, lr 0.01, weight decay 4e-4, no clipping, ρ = 0.05 (the
    # middle of its grid), W = 30, 10,000 rounds. τ_D is measured (see strategies/fedgf.py).
    "fedgf-cifar10": {
        "dataset": "cifar10", "model": "cnn", "partition": "dirichlet-equal", "dirichlet-alpha": 0.05,
        "num-clients": 100, "clients-per-round": 5, "rounds": 10000, "local-epochs": 1, "batch-size": 64,
        "strategy": "fedgf", "lr": 0.01, "momentum": 0.0, "weight-decay": 4e-4, "eval-every": 100,
        "methods": {"fedgf": {"rho": 0.05, "gf-window": 30}},
    },
    # FedGloSS (Caldarola et al., CVPR 2025; paper_experiments/cnn_cifar10.sh): the same CNN and split,
    # ρ = ρ_l = 0.15, β = 10, a 2000-round warm-up from ρ_0 = 0.001, server SGD with η_g = 1 and no
    # momentum, lr 0.01, weight decay 4e-4, 10,000 rounds.
    "fedgloss-cifar10": {
        "dataset": "cifar10", "model": "cnn", "partition": "dirichlet-equal", "dirichlet-alpha": 0.05,
        "num-clients": 100, "clients-per-round": 5, "rounds": 10000, "local-epochs": 1, "batch-size": 64,
        "strategy": "fedgloss", "lr": 0.01, "momentum": 0.0, "weight-decay": 4e-4, "eval-every": 100,
        "methods": {"fedgloss": {"rho": 0.15, "gloss-server-rho": 0.15, "gloss-beta": 10.0, "gloss-warmup": 2000,
                                 "gloss-rho0": 0.001, "gloss-momentum": 0.0, "server-lr": 1.0}},
    },
}
