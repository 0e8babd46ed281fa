"""``fedsam partition``: make a split, print how heterogeneous it is, write it and its picture."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fedsam.data import DataError, PartitionError, cached_partition, format_summary, label_counts, load, summarize
from fedsam.data import write_partition_json
from simulations import config
from simulations.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("partition", help="split a dataset across clients and report the split",
                                   description=__doc__)
    config.add_flags(parser, groups=("data", "partition"))
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for partition.json and the heatmap PNG")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.resolve(config.flags_given(args))
        # a split needs no rounds: clients-per-round (default 5) must not refuse 3 clients
        config.validate(dataclasses.replace(cfg, clients_per_round=min(cfg.clients_per_round, cfg.num_clients)))
        data = load(cfg.dataset, cfg.data_dir, download=cfg.download)
        labels = data.train_labels.numpy()
        partition = cached_partition(labels, cfg.partition_spec(), data.num_classes)
    except (config.ConfigError, DataError, PartitionError) as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc.strerror or exc}") from None
    summary = summarize(partition, labels, data.num_classes)
    print(format_summary(cfg.dataset, partition, summary, len(labels)))
    write_partition_json(out / "partition.json", cfg.dataset, partition, summary)
    from simulations import plots  # matplotlib: 0.5 s, paid only by the command that draws

    title = f"{cfg.dataset} · {partition.spec.describe()} · {cfg.num_clients} clients · seed {cfg.seed}"
    plots.label_heatmap(label_counts(partition, labels, data.num_classes), data.classes,
                        out / "label_counts.png", title)
    print(f"wrote {out / 'partition.json'} and {out / 'label_counts.png'}")
    return 0
