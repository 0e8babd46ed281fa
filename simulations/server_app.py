"""The Flower ServerApp, for ``flwr run .``: the run config (``[tool.flwr.app.config]`` and
``--run-config``) is the experiment config, key for key."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from simulations import config as configuration
from simulations.experiment import check, run_experiment, write_run_files

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = configuration.apply(configuration.ExperimentConfig(), dict(context.run_config), "run config").resolved()
    out = Path(cfg.out or f"runs/flwr-run-{context.run_id}")
    checked = check(cfg, out)
    write_run_files(checked, out)
    run_experiment(grid, cfg, out, data=checked.data)
