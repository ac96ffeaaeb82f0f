"""Shared fixtures: Flower switched offline, small datasets in the official formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)

from qd_app.core.provisioning import write_idx  # noqa: E402  (after the environment is set)


def pattern_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 images whose class is visible: a bright square at a class-specific place."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), channels, size, size), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        images[index, :, 2 + 6 * row : 7 + 6 * row, 2 + 6 * col : 7 + 6 * col] = 250
    return images


def write_idx_dataset(root: Path, folder: str, train_per_class: int, test_per_class: int) -> Path:
    """An MNIST-format dataset (IDX files in ``root/folder/raw``) with learnable classes."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, per_class, seed in (("train", train_per_class, 0), ("t10k", test_per_class, 1)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        np.random.default_rng(seed).shuffle(labels)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", pattern_images(labels, 28, 1, seed)[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> Path:
    """A small learnable dataset in MNIST's on-disk format (60 train / 10 test per class)."""
    return write_idx_dataset(tmp_path_factory.mktemp("tiny-data"), "MNIST", 60, 10)


@pytest.fixture(autouse=True)
def no_client_reply_leaks():
    """Every reply a ClientApp sends in an in-process test is audited (``tests/privacy.py``):
    a test whose clients sent anything but model parameters and small metrics fails."""
    from inprocess import LEAKS

    LEAKS.clear()
    yield
    assert not LEAKS, f"a client sent more than parameters and metrics: {LEAKS[0]}"
