"""A user's own optimizers, importable by path ('tests.plugins.custom_optim:...')."""

import torch


def signsgd(params, lr=0.01, weight_decay=0.0):
    """A first-order optimizer from a factory: SGD on the gradient's sign, via a hook-free class."""
    return SignSGD(params, lr=lr, weight_decay=weight_decay)


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=0.01, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad + group["weight_decay"] * p), alpha=-group["lr"])
        return loss


def broken(params, lr=0.01):
    raise RuntimeError("this factory always fails")


NOT_CALLABLE = 3
