"""Sparse SAM in a federation (algorithms-family.md 13, "Federated use", a project choice): the
mask is client state, returned with the model and sent back the next time the client trains, and
refreshes count the client's own cumulative epochs."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedsam import wire
from fedsam.client_app import SPARSE_EPOCH, app
from fedsam.models import build_model
from simulations import config as configuration
from fedsam.wire import train_config
from simulations.experiment import build_strategy
from tests.inprocess import InProcessGrid


def _config(cifar10_dir, **changes):
    values = {"data_dir": str(cifar10_dir), "num_clients": 3, "clients_per_round": 2, "rounds": 3, "device": "cpu",
              "batch_size": 50, "local_epochs": 1, **changes}
    cfg = configuration.apply(configuration.ExperimentConfig(), values, "test").resolved()
    configuration.validate(cfg)
    return cfg


@pytest.mark.parametrize("spec,extra", [("ssam-d", {"ssam_sparsity": 0.5, "ssam_update_freq": 1}),
                                        ("ssam-f", {"ssam_sparsity": 0.5, "ssam_update_freq": 1,
                                                    "ssam_fisher_samples": 8})])
@pytest.mark.long
def test_each_client_gets_its_own_mask_back_and_its_epochs_count_on(cifar10_dir, spec, extra):
    cfg = _config(cifar10_dir, optimizer=spec, **extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    strategy = build_strategy(cfg, [n for n, _ in model.named_parameters()])
    grid = InProcessGrid(app, cfg.num_clients)
    arrays, train = ArrayRecord(model.state_dict()), train_config(cfg)
    returned = {}
    size = sum(p.numel() for p in model.parameters())
    for rnd in (1, 2, 3):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train)), grid))
        for message in messages:
            pid = grid.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            sent = wire.client_record(message.content, wire.OPTIMIZER_STATE, pid)
            if pid in returned:  # exactly what it sent back last time
                assert sent is not None
                assert all(torch.equal(torch.from_numpy(sent[k].numpy()), returned[pid][k]) for k in returned[pid])
            else:
                assert sent is None
        replies = grid.send_and_receive(messages)
        for reply in replies:
            pid = strategy.partition_id(reply.metadata.src_node_id)
            state = reply.content[wire.OPTIMIZER_STATE].to_torch_state_dict()
            returned[pid] = state
            live = sum(int(v.sum()) for k, v in state.items() if k != SPARSE_EPOCH)
            if spec == "ssam-f":
                assert live == size // 2  # ⌊P(1 − s)⌋ after the refresh at the first step of epoch 0
            else:  # kept ⌊(P − Ps)(1 − r)⌋ plus grown ⌊min((P − Ps) r, Ps)⌋: the two floors may lose one
                assert size // 2 - 1 <= live <= size // 2
            assert int(state[SPARSE_EPOCH]) >= 1
        arrays, _ = strategy.aggregate_train(rnd, replies)
    assert strategy.optimizer_states  # kept in the checkpoint with the rest of the strategy's state
    assert "optimizer_states" in strategy.checkpoint_state()
