"""Dataset readers (official on-disk formats), normalisation and partitioning."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import pattern_images, write_idx_dataset

from qd_app.config import RunConfig
from qd_app.core.data import DATASETS, client_train_data, dirichlet_partition, iid_partition, load_split
from qd_app.node_config import NodeSettings


def test_mnist_reader_reads_idx_files_and_normalises(tiny_mnist_dir):
    train = load_split("mnist", tiny_mnist_dir, True)
    test = load_split("mnist", tiny_mnist_dir, False)
    assert train.images.shape == (600, 1, 28, 28) and test.images.shape == (100, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.class_counts(10) == [60] * 10
    raw = torchvision.datasets.MNIST(str(tiny_mnist_dir), train=False).data[0].float() / 255
    assert torch.allclose(test.images[0, 0], (raw - 0.1307) / 0.3081)


def test_fashion_mnist_reader(tmp_path):
    write_idx_dataset(tmp_path, "FashionMNIST", 3, 2)
    split = load_split("fashion-mnist", tmp_path, False)
    assert split.images.shape == (20, 1, 28, 28)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_reader_reads_python_batches(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = []
    for index, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                                  "test_batch"]):
        labels = np.arange(10).repeat(2) if name == "test_batch" else np.arange(10)
        pixels = pattern_images(labels, 32, 3, index).transpose(0, 2, 3, 1).transpose(0, 3, 1, 2)
        batch = {"data": pixels.reshape(len(labels), -1), "labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        files.append(name)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n in files[:5]])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setitem(cls.meta, "md5", _md5(folder / "batches.meta"))
    train = load_split("cifar10", tmp_path, True)
    test = load_split("cifar10", tmp_path, False)
    assert train.images.shape == (50, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert test.labels.tolist() == np.arange(10).repeat(2).tolist()


def test_svhn_reader_reads_mat_files_and_maps_label_10_to_0(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    folder = tmp_path / "SVHN"
    folder.mkdir()
    split_list = dict(torchvision.datasets.SVHN.split_list)
    for split, count in (("train", 30), ("test", 10)):
        labels = (np.arange(count) % 10) + 1  # SVHN stores digit 0 as label 10
        images = pattern_images(labels % 10, 32, 3, 0).transpose(2, 3, 1, 0)  # (H, W, C, N)
        path = folder / f"{split}_32x32.mat"
        scipy_io.savemat(path, {"X": images, "y": labels.reshape(-1, 1)})
        url, filename, _ = split_list[split]
        split_list[split] = [url, filename, _md5(path)]
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", split_list)
    test = load_split("svhn", tmp_path, False)
    assert test.images.shape == (10, 3, 32, 32)
    assert sorted(set(test.labels.tolist())) == list(range(10))


def test_every_dataset_has_one_normalisation_per_channel():
    for spec in DATASETS.values():
        assert len(spec.mean) == len(spec.std) == spec.channels


def _labels(per_class: int = 500, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def test_dirichlet_partition_covers_every_sample_once_and_is_deterministic():
    labels = _labels()
    shares = dirichlet_partition(labels, 10, 0.1, seed=3)
    combined = np.concatenate(shares)
    assert len(combined) == len(labels) and len(np.unique(combined)) == len(labels)
    again = dirichlet_partition(labels, 10, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shares, again))
    other = dirichlet_partition(labels, 10, 0.1, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shares, other))


def test_small_alpha_is_non_iid_and_large_alpha_is_near_uniform():
    labels = _labels()

    def dominant_class_share(alpha):
        shares = dirichlet_partition(labels, 10, alpha, seed=0)
        return np.mean([np.bincount(labels[s]).max() / len(s) for s in shares if len(s)])

    assert dominant_class_share(0.1) > 0.5
    assert dominant_class_share(100.0) < 0.2


def test_iid_partition_is_balanced():
    shares = iid_partition(1003, 10, seed=0)
    assert sorted(len(share) for share in shares) == [100] * 7 + [101] * 3
    assert len(np.unique(np.concatenate(shares))) == 1003


def test_client_data_is_the_partition_of_the_training_split(tiny_mnist_dir):
    config = RunConfig(data_dir=str(tiny_mnist_dir), partitioning="iid")
    parts = [client_train_data(config, NodeSettings(i, 3)) for i in range(3)]
    assert sum(len(p) for p in parts) == 600
    assert sum(np.array(p.class_counts(10)) for p in parts).tolist() == [60] * 10
