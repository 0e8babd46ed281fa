"""Plug-in optimizers that misbehave on chosen clients, for the failure tests.

Which clients and rounds: the environment variables FEDSAM_TEST_FAIL and FEDSAM_TEST_NAN, each a
comma-separated list of ``partition`` or ``partition@round`` (they reach Ray workers too)."""

import os

import torch


def _chosen(variable: str, partition_id: int, server_round: int) -> bool:
    for item in filter(None, os.environ.get(variable, "").split(",")):
        pid, _, rnd = item.partition("@")
        if int(pid) == partition_id and (not rnd or int(rnd) == server_round):
            return True
    return False


class Raising(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated by the test)")


class Poisoning(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(float("nan"))
        return loss


class Exploding(torch.optim.SGD):
    """Finite but enormous weights: the clients' replies pass, the global model's test loss does not."""

    exploded = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.exploded:  # frozen at about 1e29: finite, but no logit survives it
            with torch.enable_grad():
                return closure()
        loss = super().step(closure)
        self.exploded = True
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1e30)
        return loss


def flaky(params, lr=0.01, partition_id=0, server_round=1):
    """SGD, except on the clients named in FEDSAM_TEST_FAIL (raises) or FEDSAM_TEST_NAN (NaN weights)."""
    if _chosen("FEDSAM_TEST_FAIL", partition_id, server_round):
        return Raising(params, lr=lr)
    if _chosen("FEDSAM_TEST_NAN", partition_id, server_round):
        return Poisoning(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def explode_in_round_2(params, lr=0.01, server_round=1):
    return Exploding(params, lr=lr) if server_round == 2 else torch.optim.SGD(params, lr=lr)
