"""Fixtures only; shared helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import write_cifar10


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10: 1,000 training and 200 test images, 10 balanced classes."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))
