"""The ClientApp's handlers on a synthetic partition, called as Flower calls them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsam.client_app import app
from fedsam.runtime import round_seed
from fedsam.data import PartitionSpec, load, make_partition
from fedsam.models import build_model
from simulations.config import ExperimentConfig
from fedsam.wire import train_config
from tests.inprocess import ensure_task_identity


def _config(cifar10_dir, **overrides) -> ConfigRecord:
    settings = dict(data_dir=str(cifar10_dir), num_clients=4, partition="dirichlet", dirichlet_alpha=0.5,
                    batch_size=32, local_epochs=2, device="cpu")
    cfg = ExperimentConfig(**{**settings, **overrides}).resolved()
    record = train_config(cfg)
    record["server-round"] = 3
    return record


def _context(pid, num=4, **extra):
    return Context(run_id=1, node_id=100 + pid, state=RecordDict(), run_config={},
                   node_config={"partition-id": pid, "num-partitions": num, **extra})


def _message(config, model, message_type="train", momentum=None):
    ensure_task_identity()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    if momentum is not None:
        content["momentum"] = momentum
    return Message(content, dst_node_id=101, message_type=message_type)


def test_train_handler_trains_its_own_partition(cifar10_dir):
    config = _config(cifar10_dir, strategy="fedsam")
    torch.manual_seed(0)
    model = build_model("cnn", 10)
    reply = app(_message(config, model), _context(1))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    data = load("cifar10", cifar10_dir)
    part = make_partition(data.train_labels.numpy(), PartitionSpec("dirichlet", 4, 0, 0.5, 2), 10)
    n = len(part.clients[1])
    assert metrics["num-examples"] == n
    assert metrics["num-steps"] == 2 * -(-n // 32)  # K_i = E·⌈n_i/b⌉, the last batch kept
    assert np.isfinite(metrics["train-loss"]) and 0 <= metrics["train-accuracy"] <= 1
    new = reply.content["arrays"].to_torch_state_dict()
    assert set(new) == set(model.state_dict())
    assert any(not torch.equal(new[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("norm,lone_batch_kept", [("group", True), ("batch", False)])
def test_a_lone_last_sample_is_its_own_step_unless_batchnorm_cannot_train_on_it(cifar10_dir, norm, lone_batch_kept):
    """A batch size one less than the client's data leaves one sample over: a GroupNorm ResNet
    steps on it (⌈n/b⌉ steps, as the spec counts), a BatchNorm one folds it into the batch before."""
    data = load("cifar10", cifar10_dir)
    n = len(make_partition(data.train_labels.numpy(), PartitionSpec("dirichlet", 4, 0, 0.5, 2), 10).clients[1])
    config = _config(cifar10_dir, strategy="fedavg", model="resnet18", norm=norm, batch_size=n - 1, local_epochs=1)
    torch.manual_seed(0)
    reply = app(_message(config, build_model("resnet18", 10, norm)), _context(1))
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-steps"] == (2 if lone_batch_kept else 1)


def test_same_message_same_result_and_round_seeds_differ(cifar10_dir):
    config = _config(cifar10_dir)
    torch.manual_seed(0)
    model = build_model("cnn", 10)
    first = app(_message(config, model), _context(2)).content["arrays"].to_torch_state_dict()
    again = app(_message(config, model), _context(2)).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert round_seed(0, 3, 2) != round_seed(0, 4, 2) != round_seed(0, 3, 1)


@pytest.mark.long
def test_momentum_record_reaches_training(cifar10_dir):
    config = _config(cifar10_dir, strategy="mofedsam")
    torch.manual_seed(0)
    model = build_model("cnn", 10)
    plain = app(_message(config, model), _context(0)).content["arrays"].to_torch_state_dict()
    config["momentum-alpha"] = 0.5
    momentum = ArrayRecord({name: torch.full_like(p, 0.01) for name, p in model.named_parameters()})
    mixed = app(_message(config, model, momentum=momentum), _context(0)).content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)


def test_query_handler_says_the_partition_id(cifar10_dir):
    msg = _message(ConfigRecord(), build_model("cnn", 10), message_type="query.partition_id")
    reply = app(msg, _context(3))
    assert reply.content["partition"]["partition-id"] == 3


@pytest.mark.parametrize("node_config,fragment", [
    ({"num-partitions": 4}, "no 'partition-id'"),
    ({"partition-id": 4, "num-partitions": 4}, "outside 0..3"),
    ({"partition-id": 0, "num-partitions": 5}, "5 partitions"),
])
def test_nodes_with_a_bad_partition_id_fail_clearly(cifar10_dir, node_config, fragment):
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=node_config)
    with pytest.raises(ValueError, match=fragment):
        app(_message(_config(cifar10_dir), build_model("cnn", 10)), ctx)


def test_node_data_dir_overrides_the_message(cifar10_dir, tmp_path):
    config = _config(cifar10_dir)
    config["data-dir"] = str(tmp_path / "elsewhere")
    reply = app(_message(config, build_model("cnn", 10)), _context(0, **{"data-dir": str(cifar10_dir)}))
    assert "num-examples" in reply.content["metrics"]


def test_a_misspelt_key_in_a_train_message_is_an_error_that_names_it(cifar10_dir):
    config = _config(cifar10_dir)
    config["weight-decy"] = 5e-4
    with pytest.raises(ValueError, match="unknown key 'weight-decy'"):  # Flower sends it back as the error reply
        app(_message(config, build_model("cnn", 10)), _context(1))


def test_a_run_setting_missing_from_a_train_message_is_an_error_that_names_it(cifar10_dir):
    config = _config(cifar10_dir)
    del config["grad-clip"]
    with pytest.raises(ValueError, match="lacks 'grad-clip'"):
        app(_message(config, build_model("cnn", 10)), _context(1))


def test_the_wire_carries_every_run_setting_and_only_the_optional_ones_that_are_set(cifar10_dir):
    from fedsam import wire

    plain = _config(cifar10_dir, strategy="fedavg")
    assert set(wire.RUN_KEYS) <= set(plain.keys()) and not set(wire.OPTIONAL_KEYS) & set(plain.keys())
    tuned = _config(cifar10_dir, strategy="fedsam", eta=0.1, ssam_update_freq=3)
    assert tuned["rho"] == 0.1 and tuned["eta"] == 0.1 and tuned["ssam-update-freq"] == 3
    assert tuned["data-dir"] == str(cifar10_dir.resolve())


def test_every_key_the_server_sends_is_one_the_client_knows(cifar10_dir):
    from fedsam.wire import TRAIN_CONFIG_KEYS

    for strategy in ("fedavg", "fedsam", "mofedsam", "fedavgm"):
        assert set(_config(cifar10_dir, strategy=strategy, rho=0.2, eta=0.1).keys()) <= TRAIN_CONFIG_KEYS
