"""The `flwr run .` side: pyproject's app section and the ServerApp reading the run config."""

from __future__ import annotations

import json
import sys

import pytest

from flwr.app import Context, RecordDict

from fedsam.client_app import app as client_app
from simulations.config import ExperimentConfig
from simulations.server_app import app as server_app
from tests.helpers import ROOT
from tests.inprocess import InProcessGrid

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Ray's settings: under ``flwr run`` the federation config (``--federation-config``) owns them.
NOT_IN_RUN_CONFIG = {"num-cpus-per-client", "num-gpus-per-client", "ray-num-cpus", "ray-address"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_app_components_and_run_config_match_the_experiment_config():
    flwr = _pyproject()["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "simulations.server_app:app", "clientapp": "fedsam.client_app:app"}
    defaults = {k: "" if v is None else v for k, v in ExperimentConfig().to_dict().items()
                if k not in NOT_IN_RUN_CONFIG}  # "" is unset: TOML has no null
    assert flwr["config"] == defaults


def test_every_setting_flwr_users_may_change_is_in_the_run_config_and_its_unset_values_read_as_defaults():
    """Flower refuses a ``--run-config`` key the app's config does not declare, so a setting left
    out of ``[tool.flwr.app.config]`` could never be set through ``flwr run``."""
    from simulations import config as configuration

    declared = _pyproject()["tool"]["flwr"]["app"]["config"]
    assert configuration.apply(ExperimentConfig(), declared, "run config") == ExperimentConfig()
    chosen = configuration.apply(ExperimentConfig(), {**declared, "optimizer": "asam", "rho": 0.5, "eta": 0.01},
                                 "run config")
    assert (chosen.optimizer, chosen.rho, chosen.eta, chosen.ssam_sparsity) == ("asam", 0.5, 0.01, None)


def test_a_misspelt_run_config_key_that_reaches_the_server_app_fails_in_one_line_naming_it(tmp_path):
    from simulations import config as configuration

    declared = _pyproject()["tool"]["flwr"]["app"]["config"]
    with pytest.raises(configuration.ConfigError, match="^run config: unknown setting 'rhoo'$"):
        server_app(grid=InProcessGrid(client_app, 1), context=Context(
            run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config={**declared, "rhoo": 0.1}))



def test_a_setting_of_another_method_in_the_run_config_is_refused_as_fedsam_run_refuses_it(tmp_path):
    """pyproject's defaults carry every method's settings; only one changed for a method that does
    not take it is refused (``fedsam run --strategy scaffold --momentum-alpha 0.5`` is)."""
    from simulations import config as configuration

    declared = _pyproject()["tool"]["flwr"]["app"]["config"]
    with pytest.raises(configuration.ConfigError, match="^run config: --strategy scaffold does not take momentum-alpha"):
        server_app(grid=InProcessGrid(client_app, 1), context=Context(
            run_id=9, node_id=0, node_config={}, state=RecordDict(),
            run_config={**declared, "strategy": "scaffold", "momentum-alpha": 0.5, "out": str(tmp_path / "o")}))


@pytest.mark.long
def test_the_server_app_runs_an_experiment_from_the_run_config(cifar10_dir, tmp_path):
    run_config = {k: v for k, v in _pyproject()["tool"]["flwr"]["app"]["config"].items()}
    run_config.update({"data-dir": str(cifar10_dir), "num-clients": 3, "clients-per-round": 2, "rounds": 2,
                       "strategy": "fedsam", "device": "cpu", "out": str(tmp_path / "flwr")})
    context = Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app(grid=InProcessGrid(client_app, 3), context=context)
    cfg = json.loads((tmp_path / "flwr" / "config.json").read_text())
    assert cfg["strategy"] == "fedsam" and cfg["optimizer"] == "sam" and cfg["num-clients"] == 3
    assert len((tmp_path / "flwr" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("name", ["Scaffold", "FedSMOO", "FedLESAM", "FedGloSS"])
@pytest.mark.long
def test_a_strategy_runs_under_flowers_own_start_in_a_plain_server_app(cifar10_dir, name):
    """Flower users drive the strategies with ``strategy.start(...)`` in their own ServerApp; the
    methods whose messages carry the most (per-client records, duals coming back, a perturbed
    model) train through it with the real ClientApp."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord

    import strategies
    from fedsam.models import build_model
    from simulations import config as configuration
    from fedsam.wire import train_config

    cfg = configuration.apply(configuration.ExperimentConfig(), {
        "data_dir": str(cifar10_dir), "num_clients": 3, "clients_per_round": 2, "device": "cpu",
        "strategy": {"Scaffold": "scaffold", "FedSMOO": "fedsmoo", "FedLESAM": "fedlesam",
                     "FedGloSS": "fedgloss"}[name]}, "test").resolved()
    torch.manual_seed(0)
    start = ArrayRecord(build_model(cfg.model, 10).state_dict())
    strategy = getattr(strategies, name)(3, 2, seed=1)
    result = strategy.start(grid=InProcessGrid(client_app, 3), initial_arrays=start, num_rounds=2,
                            train_config=train_config(cfg))
    final = result.arrays
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert all(np.isfinite(final[k].numpy()).all() for k in final.keys())
    assert any(not np.array_equal(final[k].numpy(), start[k].numpy()) for k in final.keys())
