"""A client's view of a run: its validated settings, its data, its model and its store.

Built from the run and node config of a message's context (or the same two dicts in
the node's worker process). A process keeps the clients of its last runs
(:func:`kept_client`), so a client's partition is sliced once per run and its store read
and checksummed once, not on every message: in simulation one process serves many
messages of many partitions.
"""

from __future__ import annotations

import copy
import functools
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from .. import protocol
from ..config import RunConfig
from ..core.data import LabeledImages, client_train_data, dataset_spec
from ..core.distillation import SyntheticSet
from ..core.models import ModelSpec, build_model
from ..core.training import resolve_device, seeded_generator
from ..node_config import NodeSettings
from ..core.unlearning import GOAL_SAMPLES
from .store import check_identity, load_store, save_store, store_path


@dataclass(frozen=True)
class ClientRun:
    """A client's view of the run: settings, its partition, its device and its store."""

    config: RunConfig
    node: NodeSettings
    device: torch.device
    _store: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def from_configs(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientRun:
        """Validate a run config and a node config."""
        node = NodeSettings.from_node_config(node_config)
        config = node.apply(RunConfig.from_run_config(run_config))
        return cls(config, node, resolve_device(config.device))

    @functools.cached_property
    def train_data(self) -> LabeledImages:
        """This client's training samples (in page-locked memory when the device is a GPU, so
        copies to it can overlap the computation)."""
        data = client_train_data(self.config, self.node)
        if self.device.type == "cuda":
            data = LabeledImages(data.images.pin_memory(), data.labels.pin_memory())
        return data

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return dataset_spec(self.config.dataset).num_classes

    @property
    def model_spec(self) -> ModelSpec:
        """The architecture of the run's model."""
        return ModelSpec.from_config(self.config)

    def model(self, arrays: ArrayRecord) -> nn.Module:
        """The configured model holding the parameters in ``arrays``, on the device."""
        model = build_model(self.model_spec)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model.to(self.device)

    @property
    def store_file(self) -> Path:
        """This client's synthetic store for the run's experiment."""
        return store_path(self.config.store_path, self.config.experiment, self.node.partition_id)

    def store_identity(self) -> dict[str, Any]:
        """What a store must have been made from to serve this run."""
        settings = self.config
        return {
            "dataset": settings.dataset,
            "model": self.model_spec.as_dict(),
            "experiment": settings.experiment,
            "partition-id": self.node.partition_id,
            "num-partitions": self.node.num_partitions,
            "partitioning": settings.partitioning,
            "alpha": settings.alpha,
            "seed": settings.seed,
            "scale": settings.scale,
        }

    def load_store(self) -> tuple[SyntheticSet, dict[str, Any]]:
        """A copy of the client's store, refused if it was made for another setup.

        The file is read, checksummed and checked once; later calls read it again only if
        it changed (another inode, size or modification time: every write replaces it).
        """
        path = self.store_file
        try:
            stat = path.stat()
            version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            version = None
        if version is None or self._store.get("version") != version:
            self._store.clear()
            synthetic_set, metadata = load_store(path)
            check_identity(path, metadata, self.store_identity())
            self._store.update(version=version, synthetic_set=synthetic_set, metadata=metadata)
        return _copy_set(self._store["synthetic_set"]), copy.deepcopy(self._store["metadata"])

    def save_store(self, synthetic_set: SyntheticSet, metadata: dict[str, Any]) -> int:
        """Write the store atomically; returns its size in bytes."""
        metadata = {
            **metadata,
            **self.store_identity(),
            "class-counts": self.train_data.class_counts(self.num_classes),
            "synthetic-counts": synthetic_set.class_counts(self.num_classes),
        }
        return save_store(self.store_file, synthetic_set, metadata)

    def stage_source(self, config: ConfigRecord) -> SyntheticSet:
        """The data a stage draws from: the synthetic store (QuickDrop) or, for the
        baselines (``data`` = ``original``), the client's original data."""
        if config.get(protocol.DATA, protocol.SYNTHETIC) == protocol.ORIGINAL:
            data = self.train_data
            return SyntheticSet(data, LabeledImages(data.images[:0], data.labels[:0]))
        return self.load_store()[0]

    def goal_sample(self, config: ConfigRecord) -> LabeledImages:
        """Up to GOAL_SAMPLES of the client's real samples, drawn from ``seed``: what a
        client-level ascent's goal is judged on (a forward pass, no gradient)."""
        data = self.train_data
        order = torch.randperm(len(data), generator=self.generator(config, 6))
        return data.subset(order[:GOAL_SAMPLES])

    def generator(self, config: ConfigRecord, stage: int) -> torch.Generator:
        """Randomness of one client in one round of one stage, reproducible from ``seed``."""
        return seeded_generator(self.config.seed, stage, int(config[protocol.SERVER_ROUND]), self.node.partition_id)


def _copy_set(synthetic_set: SyntheticSet) -> SyntheticSet:
    """A copy the caller may change in place (training updates the synthetic images)."""
    return SyntheticSet(*(LabeledImages(part.images.clone(), part.labels.clone())
                          for part in (synthetic_set.synthetic, synthetic_set.augmentation)))


KEEP_RUNS = 2  # the runs (settings) whose clients a process keeps
_kept: OrderedDict[str, dict[str, ClientRun]] = OrderedDict()


def kept_client(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientRun:
    """The client of these settings, built once per process and kept, with every other
    partition's client of the same run, until a process has seen ``KEEP_RUNS`` newer runs.
    Memory: at most the dataset's training split per kept run (partitions are disjoint)."""
    run_key = json.dumps(dict(run_config), sort_keys=True, default=str)
    node_key = json.dumps(dict(node_config), sort_keys=True, default=str)
    clients = _kept.pop(run_key, {})
    if node_key not in clients:
        clients[node_key] = ClientRun.from_configs(run_config, node_config)
    _kept[run_key] = clients
    while len(_kept) > KEEP_RUNS:
        _kept.popitem(last=False)
    return clients[node_key]
