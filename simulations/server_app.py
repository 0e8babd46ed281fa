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
    values = dict(context.run_config)  # every key, pyproject's defaults included
    cfg = configuration.apply(configuration.ExperimentConfig(), values, "run config")
    default = configuration.ExperimentConfig()
    changed = {k: v for k, v in values.items()
               if getattr(cfg, k.replace("-", "_"), None) != getattr(default, k.replace("-", "_"), None)}
    configuration.check_methods(cfg.strategy, changed, "run config")  # as `fedsam run` refuses its flags
    cfg = cfg.resolved()
    out = Path(cfg.out or f"runs/flwr-run-{context.run_id}")
    checked = check(cfg, out)
    write_run_files(checked, out)
    run_experiment(grid, cfg, out, data=checked.data)
