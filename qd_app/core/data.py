"""Datasets, their normalisation, and the split of the training data into clients.

Readers use torchvision's dataset classes and file layouts under ``data-dir``:
``MNIST/raw``, ``FashionMNIST/raw``, ``cifar-10-batches-py`` and ``SVHN/*.mat``.
Missing files are fetched by :mod:`qd_app.core.provisioning`. Images are held as one
normalised float tensor per split (one normalisation per dataset, shared by train
and test), cached per process so a client handling many messages reads them once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from ..config import RunConfig
from ..node_config import NodeSettings
from .provisioning import ensure_dataset


@dataclass(frozen=True)
class LabeledImages:
    """Normalised images ``(N, C, H, W)`` and their integer labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor) -> LabeledImages:
        """The samples at ``indices``, in that order."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return LabeledImages(self.images[index], self.labels[index])

    def class_counts(self, num_classes: int) -> list[int]:
        """Number of samples of each class."""
        return torch.bincount(self.labels, minlength=num_classes).tolist()


RawReader = Callable[[Path, bool, bool], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DatasetSpec:
    """Shape, classes, normalisation and on-disk layout of one dataset."""

    name: str
    folder: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    setup_hint: str
    read_raw: RawReader

    def fetch_with_torchvision(self, root: Path) -> None:
        """Download both splits into ``root`` with torchvision's own downloader."""
        for train in (True, False):
            self.read_raw(root, train, True)

    def check(self, root: Path) -> None:
        """Read both splits from ``root``; raise if missing or malformed."""
        for train in (True, False):
            images, labels = self.read_raw(root, train, False)
            if images.shape[1:] != (self.channels, self.image_size, self.image_size):
                raise RuntimeError(f"{self.name} images have shape {images.shape[1:]}")
            if len(images) != len(labels) or len(labels) == 0:
                raise RuntimeError(f"{self.name} has {len(images)} images and {len(labels)} labels")

    def normalise(self, images_uint8: np.ndarray) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` pixels to the normalised float tensor every model sees."""
        return self.normalise_pixels(torch.from_numpy(np.ascontiguousarray(images_uint8)).float().div_(255.0))

    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float pixels in [0, 1] ``(N, C, H, W)`` to the normalised tensor (in place)."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return pixels.sub_(mean).div_(std)


def _read_idx_dataset(cls: type) -> RawReader:
    def read(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
        dataset = cls(str(root), train=train, download=download)
        return dataset.data.numpy()[:, None], dataset.targets.numpy().astype(np.int64)

    return read


def _read_cifar10(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    dataset = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    return dataset.data.transpose(0, 3, 1, 2), np.asarray(dataset.targets, dtype=np.int64)


def _read_svhn(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    split = "train" if train else "test"
    dataset = torchvision.datasets.SVHN(str(root / "SVHN"), split=split, download=download)
    return dataset.data, dataset.labels.astype(np.int64)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", "MNIST", 1, 28, 10, (0.1307,), (0.3081,),
        "Place the four uncompressed IDX files (train-images-idx3-ubyte, ...) in "
        "<data-dir>/MNIST/raw/.",
        _read_idx_dataset(torchvision.datasets.MNIST),
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "FashionMNIST", 1, 28, 10, (0.2860,), (0.3530,),
        "Install it with `apt-get install dataset-fashion-mnist`, or place the four "
        "uncompressed IDX files in <data-dir>/FashionMNIST/raw/.",
        _read_idx_dataset(torchvision.datasets.FashionMNIST),
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar-10-batches-py", 3, 32, 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        "Download cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
        "and extract it into <data-dir>, giving <data-dir>/cifar-10-batches-py/.",
        _read_cifar10,
    ),
    "svhn": DatasetSpec(
        "svhn", "SVHN", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
        "Download train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/) "
        "into <data-dir>/SVHN/.",
        _read_svhn,
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by its ``dataset`` setting."""
    return DATASETS[name]


@functools.lru_cache(maxsize=4)
def load_split(name: str, data_dir: Path, train: bool) -> LabeledImages:
    """One split of a dataset, fetched first if it is not on disk."""
    spec = DATASETS[name]
    try:
        images, labels = spec.read_raw(data_dir, train, False)
    except (RuntimeError, OSError):
        ensure_dataset(spec, data_dir)
        images, labels = spec.read_raw(data_dir, train, False)
    return LabeledImages(spec.normalise(images), torch.from_numpy(labels))


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split sample indices among clients, non-IID by class (the QuickDrop paper's scheme).

    For every class c, proportions p_c ~ Dirichlet(alpha * 1_N) cut that class's
    shuffled samples among the N clients. No minimum size: with small alpha most
    clients lack most classes, and a client may get no data at all.
    """
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cls in np.unique(labels):
        indices = np.flatnonzero(labels == cls)
        rng.shuffle(indices)
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
        for client, part in enumerate(np.split(indices, cuts)):
            shares[client].append(part)
    return [np.sort(np.concatenate(parts)) for parts in shares]


def iid_partition(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Split sample indices uniformly at random into near-equal shares."""
    permutation = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(permutation, num_partitions)]


@functools.lru_cache(maxsize=4)
def _partitions(
    name: str, data_dir: Path, num_partitions: int, partitioning: str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    labels = load_split(name, data_dir, True).labels.numpy()
    if partitioning == "iid":
        return tuple(iid_partition(len(labels), num_partitions, seed))
    return tuple(dirichlet_partition(labels, num_partitions, alpha, seed))


def partition_indices(config: RunConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Indices into the training split of every client, as configured."""
    return _partitions(
        config.dataset, config.data_path, num_partitions, config.partitioning, config.alpha, config.seed
    )


def client_train_data(config: RunConfig, node: NodeSettings) -> LabeledImages:
    """The training samples of the client ``node.partition_id``."""
    indices = partition_indices(config, node.num_partitions)[node.partition_id]
    return load_split(config.dataset, config.data_path, True).subset(indices)


def evaluation_split(config: RunConfig) -> LabeledImages:
    """The full test split, on which the server evaluates every round."""
    return load_split(config.dataset, config.data_path, False)
