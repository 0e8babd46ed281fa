"""Run folders from someone else: their data files are read, never executed."""

from __future__ import annotations

import builtins
import json
import os
import pickle

import numpy as np
import pytest

from fedsam.data import DataError, load
from fedsam.data.cifar import read_pickle
from tests.helpers import REAL_SUBSET, run_cli
from tests.synthetic import write_cifar10, write_cifar100


class Payload:
    """Unpickling this calls ``call(*args)``: what a crafted batch file would smuggle in."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _craft(tmp_path, payload):
    """A synthetic CIFAR-10 whose first training batch carries ``payload`` beside real arrays."""
    root = write_cifar10(tmp_path / "data", per_batch=10, test=10)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10, "batch_label": payload}, f)
    return root, batch


@pytest.mark.parametrize("how", ["os.system", "builtins.open", "builtins.exec"])
def test_a_crafted_batch_is_refused_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }[how]
    root, batch = _craft(tmp_path, payload)
    with pytest.raises(DataError) as info:
        load("cifar10", root)
    message = str(info.value)
    assert "\n" not in message and str(batch) in message and "refused global" in message
    assert how.split(".")[1] in message
    assert not marker.exists()


def test_sharpness_on_a_crafted_run_folder_exits_2_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    root, _ = _craft(tmp_path, Payload(os.system, f"touch {marker}"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"dataset": "cifar10", "data-dir": str(root), "model": "cnn"}))
    code, _, stderr = run_cli(["sharpness", run / "model.pt"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "refused global" in stderr
    assert not marker.exists()


def test_real_synthetic_and_numpy1_files_still_load(tmp_path):
    write_cifar10(tmp_path, per_batch=20, test=20)
    write_cifar100(tmp_path, train=100, test=20)
    assert load("cifar10", tmp_path).train_images.shape == (100, 3, 32, 32)
    assert load("cifar100", tmp_path).num_classes == 100
    if REAL_SUBSET.is_dir():
        assert load("cifar10", REAL_SUBSET).num_classes == 10
    # CIFAR's own files were written by numpy 1 at protocol 2: numpy.core.multiarray, plain GLOBAL opcodes
    data = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({"data": data, "labels": [1, 2]}, protocol=2)
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    old = tmp_path / "numpy1_batch"
    old.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    content = read_pickle(old, "CIFAR-10")
    assert np.array_equal(content["data"], data) and content["labels"] == [1, 2]


def test_resume_imports_no_plug_in_optimizer_it_was_not_told_to(cifar10_dir, tmp_path, capsys):
    """A run folder's config.json can name any import path; resuming it calls nothing unconfirmed."""
    out = tmp_path / "theirs"
    out.mkdir()
    marker = tmp_path / "called"
    config = {"data-dir": str(cifar10_dir), "out": str(out), "num-clients": 2, "clients-per-round": 2,
              "rounds": 1, "device": "cpu", "optimizer": "os:system"}
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["run", "--resume", out], capsys)
    assert code == 2 and "plug-in optimizer 'os:system'" in err and "--optimizer 'os:system'" in err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()
    code, _, err = run_cli(["run", "--resume", out, "--optimizer", "sgd"], capsys)
    assert code == 2 and "cannot change" in err
