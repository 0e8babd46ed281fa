"""Every method learns: on the real CIFAR-10 subset its test accuracy rises above chance (0.1)
within a few rounds (issues: "every method's accuracy rises above chance within a few rounds").
In process, one thread per client; marked slow (about half a minute a method on 2 cores).

FedGloSS runs with its warm-up (ρ from 0.001 over the 5 rounds), as its paper does: at ρ = 0.15
from the first step SAM stalls at chance for the first rounds here, FedSAM as much as FedGloSS.
For the same reason FedSAM, MoFedSAM and FedSpeed run at ρ = 0.05: from a fresh CNN, SAM at the
federated papers' ρ = 0.1 stays near chance for its first 10-30 rounds on this subset
(docs/results.md, "No slow start with ρ = 0.05"), so five rounds at 0.1 test the radius, not
whether the method learns."""

from __future__ import annotations

import json

import pytest

from simulations import config as configuration
from tests.helpers import REAL_SUBSET
from tests.inprocess import run_inprocess

SAM_START = {"rho": 0.05}  # leaves chance within five rounds here; 0.1 does not (above)
METHODS = [("fedavg", {}), ("fedsam", SAM_START), ("fedavgm", {}), ("fedprox", {}), ("fedadam", {}), ("fedcm", {}),
           ("mofedsam", SAM_START), ("scaffold", {}), ("fedgamma", {}), ("feddyn", {}), ("fedspeed", SAM_START),
           ("fedsmoo", {}), ("fedlesam", {}), ("fedlesam-s", {}), ("fedlesam-d", {}), ("fedgf", {"gf_calibration": 2}),
           ("fedgloss", {"gloss_warmup": 5}), ("fedsam", {"optimizer": "ssam-f", "ssam_fisher_samples": 16}),
           ("fedsam", {"optimizer": "ssam-d"}), ("fedsam", {"swa_start": 3, **SAM_START})]


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_SUBSET / "cifar-10-batches-py").is_dir(), reason="the real CIFAR-10 subset is absent")
@pytest.mark.parametrize("strategy,extra", METHODS, ids=[f"{s}-{'-'.join(map(str, e.values())) or 'default'}"
                                                          for s, e in METHODS])
def test_every_method_rises_above_chance_on_the_real_subset(tmp_path, strategy, extra):
    values = {"data_dir": str(REAL_SUBSET), "out": str(tmp_path / "run"), "strategy": strategy, "partition": "iid",
              "num_clients": 5, "clients_per_round": 5, "rounds": 5, "local_epochs": 1, "batch_size": 50,
              "lr": 0.05, "weight_decay": 1e-3, "grad_clip": 10.0, "device": "cpu", **extra}
    cfg = configuration.apply(configuration.ExperimentConfig(), values, "test").resolved()
    configuration.validate(cfg)
    run_inprocess(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(r["test_accuracy"] for r in records)
    assert best > 0.15, f"{strategy} {extra}: best test accuracy {best:.3f} after 5 rounds"
