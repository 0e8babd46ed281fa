"""Fixtures only; shared helpers live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.synthetic import write_cifar10


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10: 1,000 training and 200 test images, 10 balanced classes."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session", autouse=True)
def split_cache(tmp_path_factory):
    """The tests' own split cache (inherited by the runs and Ray workers they start), so a test
    never reads a split some other run left in the user's ~/.cache, nor leaves one there."""
    from fedsam.data.partition_cache import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("fedsam-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before
