"""Named settings from the literature; any flag given on the command line overrides them."""

PRESETS: dict[str, dict] = {
    # A first run: minutes on a laptop CPU, and SAM's effect already visible in the curves.
    "quickstart": {
        "dataset": "cifar10", "model": "cnn", "partition": "dirichlet", "dirichlet-alpha": 0.3,
        "num-clients": 10, "clients-per-round": 5, "rounds": 30, "local-epochs": 2, "batch-size": 32,
        "strategy": "fedsam", "optimizer": "sam", "rho": 0.1, "lr": 0.05, "momentum": 0.0,
        "weight-decay": 4e-4, "eval-every": 1,
    },
    # The MoFedSAM setting of FL-Simulator's README (Qu et al. 2022): ResNet-18 with the ImageNet
    # stem and GroupNorm(2), 100 clients, Bernoulli(0.1) participation, 5 epochs, batch 50.
    "fl-simulator-cifar10": {
        "dataset": "cifar10", "model": "resnet18-fls", "partition": "dirichlet-equal", "dirichlet-alpha": 0.3,
        "num-clients": 100, "clients-per-round": 10, "client-sampling": "bernoulli", "rounds": 1000,
        "local-epochs": 5, "batch-size": 50, "strategy": "mofedsam", "optimizer": "sam", "rho": 0.1,
        "momentum-alpha": 0.1, "lr": 0.1, "lr-decay": 0.998, "weight-decay": 1e-3, "momentum": 0.0,
        "grad-clip": 10.0, "server-lr": 1.0, "eval-every": 10,
    },
    # Caldarola et al. (ECCV 2022, debcaldarola/fedsam): LeNet-style CNN, 100 clients x 500 images
    # with Dirichlet class priors, 5 clients per round, 1 epoch, batch 64, 10,000 rounds.
    "caldarola-cifar10": {
        "dataset": "cifar10", "model": "cnn", "partition": "dirichlet-equal", "dirichlet-alpha": 0.05,
        "num-clients": 100, "clients-per-round": 5, "rounds": 10000, "local-epochs": 1, "batch-size": 64,
        "strategy": "fedsam", "optimizer": "sam", "rho": 0.1, "lr": 0.01, "momentum": 0.0,
        "weight-decay": 4e-4, "eval-every": 100,
    },
}
