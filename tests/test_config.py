"""The experiment config: layering, coercion, validation, presets, resolved defaults."""

from __future__ import annotations

import dataclasses
import re

import pytest

from simulations import config
from simulations.config import ConfigError, ExperimentConfig
from simulations.presets import PRESETS


def test_layers_defaults_preset_file_flags(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text('preset = "quickstart"\nrounds = 7\nlr = 0.2\n"dirichlet-alpha" = 1.5\n')
    cfg = config.resolve({"lr": 0.3}, config_file=str(toml))
    assert cfg.model == "cnn" and cfg.strategy == "fedsam"  # from the preset
    assert cfg.rounds == 7 and cfg.dirichlet_alpha == 1.5  # from the file
    assert cfg.lr == 0.3  # from the flags
    assert config.resolve({}, preset="caldarola-cifar10", config_file=str(toml)).num_clients == 100


def test_every_preset_is_a_valid_config():
    for name in PRESETS:
        cfg = config.resolve({}, preset=name).resolved()
        config.validate(cfg)
    fls = config.resolve({}, preset="fl-simulator-cifar10")
    assert (fls.model, fls.strategy, fls.client_sampling, fls.lr_decay, fls.grad_clip) == \
        ("resnet18-fls", "mofedsam", "bernoulli", 0.998, 10.0)


def test_resolved_fills_in_the_strategy_defaults():
    assert ExperimentConfig(strategy="fedsam").resolved().optimizer == "sam"
    assert ExperimentConfig(strategy="fedsam").resolved().rho == 0.1
    assert ExperimentConfig(strategy="fedavg").resolved().optimizer == "sgd"
    assert ExperimentConfig(strategy="fedavg").resolved().rho is None
    assert ExperimentConfig(strategy="mofedsam", optimizer="asam").resolved().rho is None


def test_keys_are_the_flag_names_both_ways():
    cfg = config.apply(ExperimentConfig(), {"num-clients": 4, "clients_per_round": 2}, "test")
    assert (cfg.num_clients, cfg.clients_per_round) == (4, 2)
    assert set(ExperimentConfig().to_dict()) == {f.name.replace("_", "-") for f in dataclasses.fields(ExperimentConfig)}


@pytest.mark.parametrize("values,fragment", [
    ({"rounds": "ten"}, "rounds must be int"),
    ({"rounds": 2.5}, "rounds must be int"),
    ({"lr": True}, "lr must be float"),
    ({"download": "maybe"}, "download must be bool"),
    ({"learning-rate": 0.1}, "unknown setting 'learning-rate'"),
])
def test_bad_values_and_unknown_keys(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config.apply(ExperimentConfig(), values, "test")


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.resolve({}, config_file=str(tmp_path / "none.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="not readable TOML"):
        config.resolve({}, config_file=str(bad))
    nested = tmp_path / "nested.toml"
    nested.write_text("[run]\nrounds = 3\n")
    with pytest.raises(ConfigError, match="top-level"):
        config.resolve({}, config_file=str(nested))
    with pytest.raises(ConfigError, match="unknown preset"):
        config.resolve({}, preset="nope")


@pytest.mark.parametrize("changes,fragment", [
    ({"clients_per_round": 11}, "clients-per-round (11) is above num-clients (10)"),
    ({"rounds": 0}, "rounds must be >= 1"),
    ({"batch_size": 0}, "batch-size must be >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"lr": -0.1}, "lr must be > 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr_decay": 1.5}, "lr-decay must be in (0, 1]"),
    ({"momentum": 1.0}, "momentum must be in [0, 1)"),
    ({"momentum_alpha": 0.0}, "momentum-alpha must be in (0, 1]"),
    ({"rho": -0.1}, "rho must be >= 0"),
    ({"strategy": "fednova"}, "unknown strategy 'fednova'"),
    ({"model": "vit"}, "unknown model 'vit'"),
    ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
    ({"num_gpus_per_client": -0.5}, "num-gpus-per-client"),
    ({"seed": 2 ** 63}, "seed must be below 2**63"),
    ({"seed": 10 ** 30}, "seed must be below 2**63"),
])
def test_validation_messages(changes, fragment):
    with pytest.raises(ConfigError) as info:
        config.validate(dataclasses.replace(ExperimentConfig(), **changes))
    assert fragment in str(info.value)


def test_the_largest_seed_allowed_is_one_torch_and_numpy_take():
    import numpy as np
    import torch

    config.validate(dataclasses.replace(ExperimentConfig(), seed=config.SEED_LIMIT - 1))
    torch.manual_seed(config.SEED_LIMIT - 1 + 1)  # the sharpness probe also seeds with seed + 1
    np.random.SeedSequence([config.SEED_LIMIT - 1, 1, 2]).generate_state(1)


@pytest.mark.parametrize("command", ["run", "sweep", "partition"])
def test_help_placeholders_say_what_a_value_is(command, capsys):
    """``--clients-per-round N``, not the field's last word in capitals (``ROUND``)."""
    from simulations.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    wanted = {"--num-clients N", "--dirichlet-alpha X", "--data-dir DIR"}
    if command != "partition":
        wanted |= {"--clients-per-round N", "--lr X", "--server-lr X", "--out DIR", "--optimizer SPEC"}
    assert all(flag in text for flag in wanted), [flag for flag in wanted if flag not in text]
    shown = dict(re.findall(r"\[--([a-z-]+) ([^\s\]]+)\]", text))  # the usage line: [--flag PLACEHOLDER]
    for name in set(shown) & {config.key(f) for f in ExperimentConfig.field_names()}:
        assert shown[name] in ("N", "X", "NAME", "DIR", "SPEC", "ADDRESS") or shown[name].startswith("{"), name


def test_an_empty_optimizer_is_unset_for_every_method_even_those_with_their_own_client():
    """``optimizer = ""`` is how a TOML file (and flwr's run config) says "the method's client"."""
    from simulations.config import resolve

    assert resolve({"strategy": "fedgf", "optimizer": ""}).resolved().optimizer == "gf-sam"
    assert resolve({"strategy": "fedsmoo", "optimizer": "", "rho": ""}).resolved().optimizer == "dual-sam"
