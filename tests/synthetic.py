"""The tests' synthetic CIFAR files come from the package (the benchmark uses them too)."""

from fedsam.data.synthetic import write_cifar10, write_cifar100

__all__ = ["write_cifar10", "write_cifar100"]
