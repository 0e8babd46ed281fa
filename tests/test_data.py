"""Loading the CIFAR layouts, and the device-resident batch source with batched augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fedsam.data import DataError, DeviceBatches, load
from fedsam.data.cifar import LAYOUTS
from tests.helpers import REAL_SUBSET
from tests.synthetic import write_cifar10, write_cifar100


def test_loads_cifar10_layout(cifar10_dir):
    data = load("cifar10", cifar10_dir)
    assert data.train_images.shape == (1000, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (200, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64 and set(data.train_labels.tolist()) == set(range(10))
    assert data.classes[0] == "airplane" and data.num_classes == 10
    # the batch folder itself works as --data-dir too
    assert torch.equal(load("cifar10", cifar10_dir / "cifar-10-batches-py").train_labels, data.train_labels)


def test_loads_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path, train=500, test=100)
    data = load("cifar100", tmp_path)
    assert data.train_images.shape == (500, 3, 32, 32) and data.num_classes == 100
    assert int(data.train_labels.max()) == 99
    raw = pickle.load(open(tmp_path / "cifar-100-python" / "train", "rb"), encoding="latin1")
    assert data.train_labels.tolist() == raw["fine_labels"]
    # images keep the row-major RGB planes of the file
    assert torch.equal(data.train_images[3].reshape(-1), torch.from_numpy(raw["data"][3]))


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load("cifar10", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "--download" in message and "data_batch_1" in message


@pytest.mark.parametrize("damage", ["garbage", "shape", "labels", "meta"])
def test_corrupt_files_are_reported(tmp_path, damage):
    folder = write_cifar10(tmp_path, per_batch=20, test=20) / "cifar-10-batches-py"
    if damage == "garbage":
        (folder / "data_batch_3").write_bytes(b"not a pickle")
    elif damage == "shape":
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, open(folder / "test_batch", "wb"))
    elif damage == "labels":
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 11]}, open(folder / "test_batch", "wb"))
    else:
        pickle.dump({"label_names": ["a"]}, open(folder / "batches.meta", "wb"))
    with pytest.raises(DataError, match="corrupt"):
        load("cifar10", tmp_path)


def test_download_goes_through_torchvision_into_the_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_cifar10(root, per_batch=10, test=10)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = load("cifar10", tmp_path / "fresh", download=True)
    assert calls == [(str(tmp_path / "fresh"), True, True)] and len(data.train_images) == 50

    class Offline:
        def __init__(self, **kwargs):
            raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError, match="could not download CIFAR-10"):
        load("cifar10", tmp_path / "offline", download=True)


@pytest.mark.skipif(not REAL_SUBSET.is_dir(), reason="the shared real CIFAR-10 subset is not here")
def test_loads_the_shared_real_subset():
    data = load("cifar10", REAL_SUBSET)
    assert len(data.train_images) == 5170 and len(data.test_images) == 1017
    counts = np.bincount(data.train_labels.numpy(), minlength=10)
    assert counts.min() >= 482 and counts.max() <= 560


# ----------------------------------------------------------------------------- batches

MEAN, STD = LAYOUTS["cifar10"].mean, LAYOUTS["cifar10"].std


def _tensors(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n)


def test_batches_cover_each_epoch_once_with_the_right_shapes_and_values():
    images, labels = _tensors()
    batches = DeviceBatches(images, labels, 10, mean=MEAN, std=STD, augment=True, shuffle=True, seed=3)
    assert len(batches) == 4
    for _ in range(2):
        seen = []
        for x, y in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
            low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
            high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
            assert (x.amin((0, 2, 3)) >= low - 1e-5).all() and (x.amax((0, 2, 3)) <= high + 1e-5).all()
            seen.append(y)
        assert [len(y) for y in seen] == [10, 10, 10, 7]
        assert sorted(torch.cat(seen).tolist()) == list(range(37))


def test_shuffling_is_seeded_and_changes_every_epoch():
    images, labels = _tensors()

    def orders(seed):
        batches = DeviceBatches(images, labels, 8, mean=MEAN, std=STD, shuffle=True, seed=seed)
        return [torch.cat([y for _, y in batches]).tolist() for _ in range(3)]

    first = orders(5)
    assert first == orders(5)
    assert first != orders(6)
    assert first[0] != first[1] != first[2]


def test_an_epoch_is_ceil_n_over_b_steps_and_only_batchnorm_models_fold_a_lone_last_sample():
    """K_i = E·⌈n_i/b⌉, last batch kept (algorithms-family.md, 0.1); BatchNorm cannot train on one
    sample, so for it the lone last sample joins the batch before."""
    images, labels = _tensors(n=21)
    assert [len(y) for _, y in DeviceBatches(images, labels, 10, mean=MEAN, std=STD)] == [10, 10, 1]
    folded = DeviceBatches(images, labels, 10, mean=MEAN, std=STD, fold_lone_last=True)
    assert [len(y) for _, y in folded] == [10, 11]
    assert len(DeviceBatches(images[:1], labels[:1], 10, mean=MEAN, std=STD, fold_lone_last=True)) == 1


def test_without_augmentation_batches_are_the_normalized_images_in_order():
    images, labels = _tensors()
    batches = DeviceBatches(images, labels, 16, mean=MEAN, std=STD)
    x = torch.cat([x for x, _ in batches])
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([y for _, y in batches]), labels)


def _coded_images(n):
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = 200: any crop or flip can be read back."""
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33).view(1, 32).expand(32, 32)
    image = torch.stack([rows, cols, torch.full((32, 32), 200)]).to(torch.uint8)
    return image.expand(n, 3, 32, 32).contiguous()


def test_crop_and_flip_do_what_they_say():
    n = 400
    batches = DeviceBatches(_coded_images(n), torch.zeros(n, dtype=torch.int64), 64, mean=(0, 0, 0),
                            std=(1 / 255,) * 3, augment=True, shuffle=True, seed=11)
    dys, dxs, flips = [], [], []
    for x, _ in batches:
        x = x.round().to(torch.int64)
        for img in x:
            inside = img[2] == 200  # padded pixels are 0 in every channel
            # the window moved by (dy, dx) in [-4, 4]: find them from any inside pixel
            r, c = [int(v[0]) for v in torch.nonzero(inside, as_tuple=True)]
            dy = int(img[0, r, c]) - 1 - r
            # rows are never flipped: row code increases by one per row wherever inside
            expected_rows = torch.arange(32).view(32, 1) + dy + 1
            assert torch.equal(img[0][inside], expected_rows.expand(32, 32)[inside])
            step = int(img[1, r, c + 1] - img[1, r, c]) if c + 1 < 32 and inside[r, c + 1] else \
                int(img[1, r, c] - img[1, r, c - 1])
            assert step in (1, -1)
            flipped = step == -1
            if flipped:
                dx = int(img[1, r, c]) - 1 - (31 - c)
                expected_cols = (31 - torch.arange(32)).view(1, 32) + dx + 1
            else:
                dx = int(img[1, r, c]) - 1 - c
                expected_cols = torch.arange(32).view(1, 32) + dx + 1
            assert torch.equal(img[1][inside], expected_cols.expand(32, 32)[inside])
            assert -4 <= dy <= 4 and -4 <= dx <= 4
            # the number of padded rows/columns matches the offset
            assert int((~inside).all(dim=1).sum()) == abs(dy)
            assert int((~inside).all(dim=0).sum()) == abs(dx)
            dys.append(dy)
            dxs.append(dx)
            flips.append(flipped)
    # statistics: offsets uniform on 9 values, flips about half (bounds ~5 standard deviations)
    for offsets in (dys, dxs):
        counts = np.bincount(np.array(offsets) + 4, minlength=9)
        assert counts.min() > 400 / 9 - 5 * np.sqrt(400 / 9) and counts.max() < 400 / 9 + 5 * np.sqrt(400 / 9)
    assert abs(np.mean(flips) - 0.5) < 5 * 0.5 / np.sqrt(400)


def test_augmentation_is_reproducible_from_the_seed():
    images, labels = _tensors()

    def first_batch(seed):
        return next(iter(DeviceBatches(images, labels, 37, mean=MEAN, std=STD, augment=True, seed=seed)))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_bad_batch_source_inputs():
    images, labels = _tensors()
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(images.float(), labels, 4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="labels"):
        DeviceBatches(images, labels[:3], 4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceBatches(images, labels, 0, mean=MEAN, std=STD)
