"""BatchNorm safety for multi-pass optimizers: only a step's first pass updates running statistics.

SAM-style optimizers run the same minibatch forward two or more times per step. If every pass
updated the BatchNorm running mean and variance, each batch would be counted twice, the later
times at perturbed weights. GroupNorm and LayerNorm models keep no running statistics and are
unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_running_stats(layers: list[_BatchNorm]) -> Iterator[None]:
    """Inside, the layers still normalize by batch statistics but leave their buffers untouched.

    With ``track_running_stats`` off in training mode, BatchNorm passes no running buffers to
    the kernel and does not count the batch, so ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` stay as they were.
    """
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class FirstPassStats:
    """Wraps a closure so that, per optimizer step, only its first call updates BatchNorm stats.

    Call ``new_step()`` before each ``optimizer.step(wrapped)``. Built once per model and
    closure; costs nothing for models without BatchNorm.
    """

    def __init__(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> None:
        self.layers = batchnorm_layers(model)
        self.closure = closure
        self.passes = 0

    def new_step(self) -> None:
        self.passes = 0

    def __call__(self) -> torch.Tensor:
        first = self.passes == 0
        self.passes += 1
        if first or not self.layers:
            return self.closure()
        with frozen_running_stats(self.layers):
            return self.closure()
