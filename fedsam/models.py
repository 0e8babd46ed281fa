"""The models of the federated SAM literature, for 32×32 images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class CaldarolaCNN(nn.Module):
    """LeNet-style CNN of Caldarola et al. (and FL-Simulator's "LeNet"):
    conv5x5 64 → pool → conv5x5 64 → pool → FC 384 → FC 192 → classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, kernel_size=5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 5 * 5, 384), nn.ReLU(inplace=True),
            nn.Linear(384, 192), nn.ReLU(inplace=True), nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "group":
        return lambda channels: nn.GroupNorm(2, channels)
    if norm == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm {norm!r} (choose group or batch)")


def resnet18_cifar(num_classes: int = 10, norm: str = "group") -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool.

    GroupNorm with 2 groups by default, as in the federated SAM papers (BatchNorm's running
    statistics do not average well across heterogeneous clients)."""
    import torchvision  # here, not at the top: it imports torch._dynamo, ~2 s in every Ray worker

    model = torchvision.models.resnet18(num_classes=num_classes, norm_layer=_norm_layer(norm))
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resnet18_fl_simulator(num_classes: int = 10, norm: str = "group") -> nn.Module:
    """FL-Simulator's "ResNet18": torchvision's ImageNet stem kept (7x7 stride-2 conv, max-pool,
    so a 32x32 image is 8x8 after it), every BatchNorm replaced by GroupNorm(2). About 1/16 of
    the CIFAR-stem model's FLOPs; use it to compare with FL-Simulator's published numbers."""
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes, norm_layer=_norm_layer(norm))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": lambda num_classes, norm="group": CaldarolaCNN(num_classes),
    "resnet18": resnet18_cifar,
    "resnet18-fls": resnet18_fl_simulator,
}


def build_model(name: str, num_classes: int, norm: str = "group") -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name](num_classes, norm=norm)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether batch statistics shape the model's training output: it cannot train on a batch of one
    sample, and clients batched together would mix into each other's statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
