"""The client-local synthetic store: atomic writes, checksums, identity checks."""

from __future__ import annotations

import os

import pytest
import torch

from qd_app.core.data import LabeledImages
from qd_app.core.distillation import SyntheticSet
from qd_app.errors import StoreError
from qd_app.client import run as run_module
from qd_app.client.run import kept_client
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


def _client(tmp_path, tiny_mnist_dir, partition=0, **settings):
    run_config = {"data-dir": str(tiny_mnist_dir), "store-dir": str(tmp_path / "stores"), "experiment": "e", **settings}
    return kept_client(run_config, {"partition-id": partition, "num-partitions": 3})


def test_a_process_keeps_the_clients_of_its_last_runs(tmp_path, tiny_mnist_dir):
    first = _client(tmp_path, tiny_mnist_dir)
    assert _client(tmp_path, tiny_mnist_dir) is first
    other_partition = _client(tmp_path, tiny_mnist_dir, partition=1)
    for seed in range(1, run_module.KEEP_RUNS + 1):  # newer runs push the first one out
        _client(tmp_path, tiny_mnist_dir, seed=seed)
    assert _client(tmp_path, tiny_mnist_dir) is not first
    assert _client(tmp_path, tiny_mnist_dir, partition=1) is not other_partition


def test_a_kept_store_is_read_once_and_again_when_its_file_changes(tmp_path, tiny_mnist_dir, monkeypatch):
    client = _client(tmp_path, tiny_mnist_dir, seed=7)
    reads = []
    monkeypatch.setattr(run_module, "load_store", lambda path: reads.append(path) or load_store(path))
    client.save_store(make_set(0.5), {"rounds-distilled": 1})
    first, metadata = client.load_store()
    first.synthetic.images.add_(100)  # a caller's changes stay its own
    metadata["rounds-distilled"] = 99
    again, metadata = client.load_store()
    assert len(reads) == 1 and float(again.synthetic.images.max()) == 0.5 and metadata["rounds-distilled"] == 1
    client.save_store(make_set(2.0), {"rounds-distilled": 2})
    assert float(client.load_store()[0].synthetic.images.max()) == 2.0 and len(reads) == 2
    content = bytearray(client.store_file.read_bytes())
    content[-5] ^= 0xFF  # corrupted in place: same size, a new modification time
    client.store_file.write_bytes(bytes(content))
    with pytest.raises(StoreError, match="checksum"):
        client.load_store()
    client.store_file.unlink()
    with pytest.raises(StoreError, match="no client store"):
        client.load_store()


@pytest.mark.parametrize("setting, value", [("dataset", "fashion-mnist"), ("model-width", 16), ("model-norm", "batch"),
                                            ("partitioning", "iid"), ("alpha", 0.5), ("seed", 3), ("scale", 50)])
def test_a_store_read_by_another_setup_is_refused_naming_what_differs(tmp_path, tiny_mnist_dir, setting, value):
    _client(tmp_path, tiny_mnist_dir, seed=11).save_store(make_set(0.5), {"rounds-distilled": 1})
    reader = _client(tmp_path, tiny_mnist_dir, **{"seed": 11, setting: value})
    named = "model" if setting.startswith("model") else setting
    with pytest.raises(StoreError, match=f"written for another setup: .*{named} .*run the training phase"):
        reader.load_store()


@pytest.mark.parametrize("damage", ["zero-length", "truncated header", "truncated payload", "bit flip",
                                    "other format version"])
def test_a_damaged_store_is_refused_with_what_to_do(tmp_path, tiny_mnist_dir, damage):
    client = _client(tmp_path, tiny_mnist_dir, seed=12)
    client.save_store(make_set(0.5), {"rounds-distilled": 1})
    content = client.store_file.read_bytes()
    damaged = {"zero-length": b"", "truncated header": content[:20], "truncated payload": content[:-100],
               "bit flip": content[:-7] + bytes([content[-7] ^ 1]) + content[-6:],
               "other format version": content.replace(b'"format-version": 1', b'"format-version": 9', 1)}[damage]
    assert damaged != content
    client.store_file.write_bytes(damaged)
    with pytest.raises(StoreError, match="delete it and train again|train again \\(phase=train\\)"):
        client.load_store()
