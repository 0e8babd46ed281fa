"""CUDA graphs for the training step: on a GPU, small models are bound by kernel launches.

A SAM step of a ResNet-18 at batch 50 is about a thousand small kernels; launched one by one
from Python, the GPU waits on the CPU. Captured once as a CUDA graph, the whole step is one
launch. ``GraphedStep`` is the one place that knows how: a few eager warm-up calls on a side
stream (they allocate the optimizer's state and the gradients), one capture, then replays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedStep:
    """Call ``step()`` eagerly ``warmup`` times, then capture it as a CUDA graph and replay it.

    ``step`` must only read tensors that outlive this object (static inputs refilled in place
    before each call; parameters and optimizer state updated in place), must keep every shape
    fixed, and must not synchronise with the host. Off the GPU, or with ``enabled=False``, each
    call simply runs ``step()``.
    """

    def __init__(self, step: Callable[[], None], device: torch.device, enabled: bool = True, warmup: int = 2) -> None:
        self.step = step
        self.enabled = enabled and device.type == "cuda"
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if not self.enabled:
            self.step()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
            self.graph = graph
            graph.replay()  # capturing records the step without running it
