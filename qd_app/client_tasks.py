"""What a client does for each message: the bridge from Flower records to torch code.

Each function takes the client's :class:`ClientRun` and record contents and returns
records; the math lives in :mod:`qd_app.training`. Replies carry only model
parameters and metrics, never data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from torch import nn

from .config import NodeSettings, RunConfig
from .data import LabeledImages, client_train_data, dataset_spec
from .models import ModelSpec, build_model
from .strategies import NUM_EXAMPLES, SAMPLE_GRADIENTS
from .training import make_optimizer, predict, resolve_device, seeded_generator, train_epochs


@dataclass(frozen=True)
class ClientRun:
    """A client's view of the run: settings, its partition and its device."""

    config: RunConfig
    node: NodeSettings
    device: torch.device

    @classmethod
    def from_context(cls, context: Context) -> ClientRun:
        """Validate the run and node settings of a message's context."""
        node = NodeSettings.from_node_config(context.node_config)
        config = node.apply(RunConfig.from_run_config(context.run_config))
        return cls(config, node, resolve_device(config.device))

    @functools.cached_property
    def train_data(self) -> LabeledImages:
        """This client's training samples."""
        return client_train_data(self.config, self.node)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return dataset_spec(self.config.dataset).num_classes

    def model(self, arrays: ArrayRecord) -> nn.Module:
        """The configured model holding the parameters in ``arrays``, on the device."""
        model = build_model(ModelSpec.from_config(self.config))
        model.load_state_dict(arrays.to_torch_state_dict())
        return model.to(self.device)


def inventory(client: ClientRun) -> MetricRecord:
    """Partition id, number of partitions and class counts of this client."""
    return MetricRecord(
        {
            "partition-id": client.node.partition_id,
            "num-partitions": client.node.num_partitions,
            "class-counts": client.train_data.class_counts(client.num_classes),
        }
    )


def local_train(client: ClientRun, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
    """FedAvg local update: ``local-epochs`` epochs of SGD on the client's data."""
    settings = client.config
    model = client.model(arrays)
    server_round = int(config["server-round"])
    stats = train_epochs(
        model,
        client.train_data,
        optimizer=make_optimizer(model, settings.lr, settings.momentum, settings.weight_decay),
        epochs=settings.local_epochs,
        max_steps=settings.local_steps,
        batch_size=settings.batch_size,
        generator=seeded_generator(settings.seed, server_round, client.node.partition_id),
        device=client.device,
    )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(client.train_data),
            SAMPLE_GRADIENTS: stats.sample_gradients,
            "train-loss": stats.mean_loss,
        }
    )
    return ArrayRecord(model.state_dict()), metrics


def local_evaluate(client: ClientRun, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy of the model on the client's own training data, overall and per class."""
    model = client.model(arrays)
    data = client.train_data
    predictions = predict(model, data.images, client.config.eval_batch_size, client.device)
    correct = int((predictions == data.labels).sum())
    return MetricRecord(
        {
            NUM_EXAMPLES: len(data),
            "accuracy": correct / len(data) if len(data) else 0.0,
            "correct-per-class": torch.bincount(
                data.labels[predictions == data.labels], minlength=client.num_classes
            ).tolist(),
            "class-counts": data.class_counts(client.num_classes),
        }
    )
