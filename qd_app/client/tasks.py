"""What a client does for each message: the bridge from Flower records to torch code.

Each function takes the client's :class:`ClientRun` and record contents and returns
records; the math lives in :mod:`qd_app.core`. A task's settings (lr, epochs, classes,
...) arrive in the message's ConfigRecord (keys in :mod:`qd_app.protocol`); the run
and node config say only what the run is (dataset, model, partition, seed, store scale,
folders) and how the node computes (device, evaluation batch size).
Replies carry only model parameters and metrics: the data and the synthetic store stay
on the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import log
from torch import nn

from .. import protocol
from ..core.data import LabeledImages, dataset_spec
from ..core.distillation import (SyntheticSet, finetune_synthetic, initial_synthetic_set, nearest_real_distances,
                                 train_with_distillation)
from ..core.models import build_model
from ..core.pruning import activation_statistics, prunable_layers
from ..core.training import TrainStats, make_optimizer, predict, train_epochs
from ..core.unlearning import fits_like_unseen, forget_data, forgotten, gradient_ascent, relearn_data, retain_data
from ..errors import StoreError
from ..resources import peak_memory_mb
from . import hdus
from .run import ClientRun


COPY_DISTANCE = 1e-6  # RMS pixel difference up to which a synthetic image counts as a copy of a real one
TrainTask = Callable[[ClientRun, ArrayRecord, ConfigRecord], tuple[ArrayRecord, MetricRecord]]


def inventory(client: ClientRun) -> ConfigRecord:
    """Partition, class counts, the state of this client's synthetic store and the bytes it
    keeps (the store and, for HDUS, its repository).

    The store is read and verified in full (so a corrupt one is refused before any
    stage), and one forward and backward pass of the model warms this process up, so
    that the first timed stage does not pay for it.
    """
    status, synthetic_counts, store_bytes = protocol.STORE_STATUS_OK, [0] * client.num_classes, 0
    if client.store_file.is_file():
        try:
            _, metadata = client.load_store()
            synthetic_counts = list(metadata["synthetic-counts"])
            store_bytes = client.store_file.stat().st_size
        except StoreError as exc:
            status = str(exc)
    else:
        status = protocol.STORE_STATUS_MISSING
    repository = hdus.repository_file(client)  # HDUS keeps its models there instead
    store_bytes += repository.stat().st_size if repository.is_file() else 0
    _warm_up(client)
    return ConfigRecord(
        {
            protocol.PARTITION_ID: client.node.partition_id,
            protocol.NUM_PARTITIONS: client.node.num_partitions,
            protocol.CLASS_COUNTS: client.train_data.class_counts(client.num_classes),
            protocol.STORE_STATUS: status,
            protocol.SYNTHETIC_COUNTS: synthetic_counts,
            protocol.STORE_BYTES: store_bytes,
        }
    )


def _warm_up(client: ClientRun) -> None:
    sample = client.train_data.subset(torch.arange(min(2, len(client.train_data))))
    if len(sample):
        model = build_model(client.model_spec).to(client.device)
        nn.functional.cross_entropy(model(sample.images.to(client.device)), sample.labels.to(client.device)).backward()


def _optimizer(model: nn.Module, config: ConfigRecord) -> torch.optim.Optimizer:
    return make_optimizer(
        model, float(config[protocol.LR]), float(config[protocol.MOMENTUM]), float(config[protocol.WEIGHT_DECAY])
    )


def _reply(model: nn.Module, num_examples: int, stats: TrainStats, **extra: float) -> tuple[ArrayRecord, MetricRecord]:
    metrics = MetricRecord(
        {protocol.NUM_EXAMPLES: num_examples, protocol.SAMPLE_GRADIENTS: stats.sample_gradients,
         protocol.TRAIN_LOSS: stats.mean_loss, **extra}
    )
    return ArrayRecord(model.state_dict()), metrics


def local_train(client: ClientRun, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
    """FedAvg local update: ``epochs`` epochs of SGD on the client's data (less ``exclude-classes``)."""
    model = client.model(arrays)
    data = client.train_data
    excluded = list(config.get(protocol.EXCLUDE_CLASSES, []))
    if excluded:
        data = retain_data(SyntheticSet(data, LabeledImages(data.images[:0], data.labels[:0])), excluded)
    stats = train_epochs(
        model, data, optimizer=_optimizer(model, config), epochs=int(config[protocol.EPOCHS]),
        max_steps=int(config[protocol.MAX_STEPS]), batch_size=int(config[protocol.BATCH_SIZE]),
        generator=client.generator(config, 0), device=client.device,
    )
    return _reply(model, len(data), stats)


def distill_train(client: ClientRun, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
    """QuickDrop training round: local SGD that also distils the data into the store.

    The store is created in the client's first round of the training (from random real
    images; the server says which) and carried across rounds; in the last round it is
    optionally fine-tuned.
    """
    server_round = int(config[protocol.SERVER_ROUND])
    metadata: dict[str, Any] = {"rounds-distilled": 0, "finetune-steps": 0}
    if bool(config[protocol.NEW_STORE]):
        synthetic_set = initial_synthetic_set(client.train_data, client.config.scale, client.generator(config, 1))
    else:
        try:
            synthetic_set, metadata = client.load_store()
        except StoreError as exc:
            log(WARNING, "Partition %s starts a new synthetic set: %s", client.node.partition_id, exc)
            synthetic_set = initial_synthetic_set(client.train_data, client.config.scale, client.generator(config, 1))
    model = client.model(arrays)
    stats = train_with_distillation(
        model, client.train_data, synthetic_set, optimizer=_optimizer(model, config),
        image_lr=float(config[protocol.DISTILL_LR]), image_momentum=float(config[protocol.DISTILL_MOMENTUM]),
        image_batch=int(config[protocol.DISTILL_BATCH]), epochs=int(config[protocol.EPOCHS]),
        max_steps=int(config[protocol.MAX_STEPS]), batch_size=int(config[protocol.BATCH_SIZE]),
        generator=client.generator(config, 2), device=client.device,
    )
    metadata["rounds-distilled"] += 1
    finetune_steps = int(config[protocol.FINETUNE_STEPS]) if server_round == int(config[protocol.NUM_ROUNDS]) else 0
    if finetune_steps:
        stats.sample_gradients += finetune_synthetic(
            synthetic_set, client.train_data, client.model_spec, steps=finetune_steps,
            image_lr=float(config[protocol.DISTILL_LR]), image_momentum=float(config[protocol.DISTILL_MOMENTUM]),
            batch_size=int(config[protocol.BATCH_SIZE]), generator=client.generator(config, 3), device=client.device,
        )
        metadata["finetune-steps"] += finetune_steps
    store_bytes = client.save_store(synthetic_set, metadata)
    privacy = _synthetic_privacy(client, synthetic_set) if server_round == int(config[protocol.NUM_ROUNDS]) else {}
    return _reply(
        model, len(client.train_data), stats,
        **{protocol.STORE_BYTES: store_bytes, protocol.MATCH_DISTANCE: stats.mean_distance,
           protocol.DISTILL_SECONDS: stats.distill_seconds, **privacy}
    )


def _synthetic_privacy(client: ClientRun, synthetic_set: SyntheticSet) -> dict[str, float | int]:
    """How close the final synthetic images stay to the client's real ones (three scalars)."""
    distances = nearest_real_distances(synthetic_set.synthetic.images, client.train_data.images,
                                       dataset_spec(client.config.dataset).std)
    if not len(distances):
        return {}
    return {protocol.SYNTHETIC_NEAREST: float(distances.mean()), protocol.SYNTHETIC_NEAREST_MIN: float(distances.min()),
            protocol.SYNTHETIC_COPIES: int((distances <= COPY_DISTANCE).sum())}


def unlearn(client: ClientRun, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
    """Gradient ascent on the forget data (the forget classes, or everything) of the stage's source.

    Class-level ascent goes until the classes are :func:`forgotten`; client-level ascent,
    given ``unseen-loss-quantiles``, until a sample of the client's real data
    :func:`fits_like_unseen` (else it runs its epochs). A client already at its goal
    takes no step and replies with weight 0, so it does not dilute the others' ascent
    in the average.
    """
    classes = None if bool(config[protocol.FORGET_EVERYTHING]) else list(config[protocol.FORGET_CLASSES])
    quantiles = list(config.get(protocol.UNSEEN_LOSS_QUANTILES, []))
    goal, goal_data = forgotten, None
    if classes is None:
        goal = fits_like_unseen(quantiles, client.num_classes) if quantiles else None
        goal_data = client.goal_sample(config) if quantiles else None
    data = forget_data(client.stage_source(config), classes)
    model = client.model(arrays)
    stats = gradient_ascent(
        model, data, optimizer=_optimizer(model, config), epochs=int(config[protocol.EPOCHS]),
        batch_size=int(config[protocol.BATCH_SIZE]), generator=client.generator(config, 4), device=client.device,
        goal=goal, goal_data=goal_data,
    )
    return _reply(model, len(data) if stats.steps else 0, stats)


def train_on_store(client: ClientRun, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
    """Recovery or relearning: SGD on the data of the classes not excluded from the stage's
    source (synthetic + augmentation, or original), relearned classes weighted up."""
    source = client.stage_source(config)
    data = relearn_data(source, list(config[protocol.RELEARN_CLASSES]), list(config[protocol.EXCLUDE_CLASSES]))
    model = client.model(arrays)
    stats = train_epochs(
        model, data, optimizer=_optimizer(model, config), epochs=int(config[protocol.EPOCHS]),
        batch_size=int(config[protocol.BATCH_SIZE]), generator=client.generator(config, 5), device=client.device,
    )
    return _reply(model, len(data), stats)


def activation_stats(client: ClientRun, arrays: ArrayRecord, config: ConfigRecord) -> MetricRecord:
    """FU-MP: per-class sums of the ``prune-target`` units' activations on the client's data."""
    data = client.train_data
    model = client.model(arrays)
    layers = prunable_layers(model, str(config[protocol.PRUNE_TARGET]))
    sums, counts = activation_statistics(model, layers, data, client.num_classes, client.config.eval_batch_size,
                                         client.device)
    return MetricRecord({
        protocol.NUM_EXAMPLES: len(data), protocol.SAMPLE_GRADIENTS: 0, protocol.COUNTS: counts.tolist(),
        **{protocol.layer_key(index): layer.flatten().tolist() for index, layer in enumerate(sums)},
    })


def local_evaluate(client: ClientRun, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy of the model on the client's own training data."""
    model = client.model(arrays)
    data = client.train_data
    predictions = predict(model, data.images, client.config.eval_batch_size, client.device)
    correct = int((predictions == data.labels).sum())
    return MetricRecord({
        protocol.NUM_EXAMPLES: len(data),
        protocol.CORRECT: correct,
        protocol.ACCURACY: correct / len(data) if len(data) else 0.0,
    })


Task = Callable[[ClientRun, RecordDict], RecordDict]


def _timed(task: Task) -> Task:
    """A task whose reply's metrics carry the client's compute seconds and peak memory."""

    def reply(client: ClientRun, content: RecordDict) -> RecordDict:
        started = time.perf_counter()
        answer = task(client, content)
        answer[protocol.METRICS][protocol.COMPUTE_SECONDS] = time.perf_counter() - started
        answer[protocol.METRICS][protocol.PEAK_MEMORY] = peak_memory_mb()
        return answer

    return reply


def _train_task(task: TrainTask) -> Task:
    """A training task as a reply: the new model and its metrics, with the client's compute seconds."""

    def reply(client: ClientRun, content: RecordDict) -> RecordDict:
        arrays, metrics = task(client, content[protocol.ARRAYS], content[protocol.CONFIG])
        return RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics})

    return _timed(reply)


TASKS: dict[str, Task] = {
    protocol.QUERY: lambda client, _: RecordDict({protocol.INVENTORY: inventory(client)}),
    protocol.message_type(protocol.QUERY, protocol.ACTIVATION_STATS): lambda client, content: RecordDict(
        {protocol.STATISTICS: activation_stats(client, content[protocol.ARRAYS], content[protocol.CONFIG])}),
    protocol.TRAIN: _train_task(local_train),
    protocol.message_type(protocol.TRAIN, protocol.DISTILL): _train_task(distill_train),
    protocol.message_type(protocol.TRAIN, protocol.UNLEARN): _train_task(unlearn),
    protocol.message_type(protocol.TRAIN, protocol.RECOVER): _train_task(train_on_store),
    protocol.message_type(protocol.TRAIN, protocol.RELEARN): _train_task(train_on_store),
    protocol.EVALUATE: lambda client, content: RecordDict(
        {protocol.METRICS: local_evaluate(client, content[protocol.ARRAYS])}),
    protocol.message_type(protocol.TRAIN, protocol.SEED): _timed(
        lambda client, content: hdus.train_seed(client, content[protocol.CONFIG])),
    protocol.message_type(protocol.EVALUATE, protocol.KEEP_SEEDS): _timed(hdus.keep_seeds),
    protocol.message_type(protocol.EVALUATE, protocol.DROP_SEEDS): _timed(
        lambda client, content: hdus.drop_seeds(client, content[protocol.CONFIG])),
    protocol.message_type(protocol.EVALUATE, protocol.ENSEMBLE): _timed(
        lambda client, content: hdus.evaluate_ensemble(client, content[protocol.CONFIG])),
}


def run_task(message_type: str, client: ClientRun, content: RecordDict) -> RecordDict:
    """The reply content of the task a message type names."""
    return TASKS[message_type](client, content)
