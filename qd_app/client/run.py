"""A client's view of a run: its validated settings, its data, its model and its store.

Built from the run and node config of a message's context (or the same two dicts in
the node's worker process); the data are loaded once per object and kept.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
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

    @classmethod
    def from_context(cls, context: Context) -> ClientRun:
        """Validate the run and node settings of a message's context."""
        return cls.from_configs(context.run_config, context.node_config)

    @classmethod
    def from_configs(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientRun:
        """Validate a run config and a node config."""
        node = NodeSettings.from_node_config(node_config)
        config = node.apply(RunConfig.from_run_config(run_config))
        return cls(config, node, resolve_device(config.device))

    @functools.cached_property
    def train_data(self) -> LabeledImages:
        """This client's training samples."""
        return client_train_data(self.config, self.node)

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
        """The client's store, refused if it was made for another setup."""
        synthetic_set, metadata = load_store(self.store_file)
        check_identity(self.store_file, metadata, self.store_identity())
        return synthetic_set, metadata

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
