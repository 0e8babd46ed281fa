"""Why the SAM curves in docs/results.md start late: SAM from a fresh CNN, in one central loop.

Trains the results' CNN on all training images with the results' local settings (batch 32,
lr 0.05, weight decay 4e-4, crop and flip), once with SGD and once with SAM per radius ρ, all
from the same initial weights and the same batches, and prints the mean training loss of each
epoch. No Flower, no partition: only the optimizer differs.

    python -m scripts.sam_slow_start --data-dir ../shared/data/cifar10-subset
"""

from __future__ import annotations

import argparse
import sys

import torch

from fedsam.data.batches import DeviceBatches
from fedsam.data.cifar import load
from fedsam.models import build_model
from fedsam.optim import build
from fedsam.train import train_locally


def loss_per_epoch(data_dir: str, rhos: list[float], epochs: int = 3, seed: int = 0,
                   lr: float = 0.05, weight_decay: float = 4e-4, batch_size: int = 32) -> dict[str, list[float]]:
    """Mean training loss of each epoch, for SGD (``"sgd"``) and SAM at each ρ (``"sam rho=…"``)."""
    data = load("cifar10", data_dir)
    torch.manual_seed(seed)
    initial = build_model("cnn", data.num_classes).state_dict()
    curves = {}
    for name, spec, options in [("sgd", "sgd", {})] + [(f"sam rho={rho}", "sam", {"rho": rho}) for rho in rhos]:
        model = build_model("cnn", data.num_classes)
        model.load_state_dict(initial)
        optimizer = build(spec, model.parameters(), lr=lr, weight_decay=weight_decay, **options)
        batches = DeviceBatches(data.train_images, data.train_labels, batch_size, mean=data.mean, std=data.std,
                                augment=True, shuffle=True, seed=seed)
        curves[name] = [train_locally(model, optimizer, batches, 1).loss for _ in range(epochs)]
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rho", default="0.02,0.05,0.1", help="comma-separated SAM radii")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    curves = loss_per_epoch(args.data_dir, [float(r) for r in args.rho.split(",")], args.epochs)
    print("optimizer      " + "  ".join(f"epoch {e + 1}" for e in range(args.epochs)) + "   (mean training loss; chance = 2.303)")
    for name, losses in curves.items():
        print(f"{name:<14} " + "  ".join(f"{loss:7.3f}" for loss in losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
