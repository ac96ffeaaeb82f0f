"""The client-local synthetic store: atomic writes, checksums, identity checks."""

from __future__ import annotations

import os

import pytest
import torch

from qd_app.core.data import LabeledImages
from qd_app.core.distillation import SyntheticSet
from qd_app.errors import StoreError
from qd_app.client.store import check_identity, load_store, save_store, store_path


def make_set(value: float) -> SyntheticSet:
    images = LabeledImages(torch.full((3, 1, 28, 28), value), torch.tensor([0, 1, 1]))
    return SyntheticSet(images, LabeledImages(images.images + 1, images.labels.clone()))


IDENTITY = {"dataset": "mnist", "model": {"name": "convnet", "width": 32}, "experiment": "e", "partition-id": 2,
            "num-partitions": 10, "partitioning": "dirichlet", "alpha": 0.1, "seed": 0, "scale": 100}


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = store_path(tmp_path, "e", 2)
    size = save_store(path, make_set(0.5), {**IDENTITY, "rounds-distilled": 3})
    assert path == tmp_path / "e" / "partition-2.qdstore" and path.stat().st_size == size
    loaded, metadata = load_store(path)
    assert torch.equal(loaded.synthetic.images, make_set(0.5).synthetic.images)
    assert torch.equal(loaded.augmentation.labels, torch.tensor([0, 1, 1]))
    assert metadata == {**IDENTITY, "rounds-distilled": 3}


@pytest.mark.parametrize("crash_in", ["fsync", "replace"])
def test_crash_while_writing_leaves_the_previous_set_intact(tmp_path, monkeypatch, crash_in):
    path = store_path(tmp_path, "e", 0)
    save_store(path, make_set(1.0), IDENTITY)

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(os, crash_in, crash)
    with pytest.raises(OSError, match="power cut"):
        save_store(path, make_set(2.0), IDENTITY)
    monkeypatch.undo()
    loaded, _ = load_store(path)
    assert float(loaded.synthetic.images.max()) == 1.0
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_truncated_or_altered_store_is_refused(tmp_path):
    path = store_path(tmp_path, "e", 0)
    save_store(path, make_set(1.0), IDENTITY)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(StoreError, match="corrupt"):
        load_store(path)
    altered = bytearray(content)
    altered[-10] ^= 0xFF
    path.write_bytes(bytes(altered))
    with pytest.raises(StoreError, match="checksum mismatch"):
        load_store(path)
    path.write_bytes(b"something else entirely")
    with pytest.raises(StoreError, match="not a qd_app synthetic store"):
        load_store(path)


def test_missing_store_says_to_train_first(tmp_path):
    with pytest.raises(StoreError, match="no client store at .*run the training phase"):
        load_store(store_path(tmp_path, "e", 0))


def test_store_of_another_setup_is_refused_naming_the_difference(tmp_path):
    path = store_path(tmp_path, "e", 0)
    with pytest.raises(StoreError, match="written for another setup: dataset 'mnist' \\(this run: 'cifar10'\\)"):
        check_identity(path, IDENTITY, {**IDENTITY, "dataset": "cifar10"})
    check_identity(path, IDENTITY, dict(IDENTITY))
