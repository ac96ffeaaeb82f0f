"""HDUS on the client: its main model, its seed model and its repository of neighbours' seed models.

The repository is one file per experiment and partition beside the synthetic stores
(``<store-dir>/<experiment>/partition-<id>.hdus``, the store format: atomic and
checksummed), so a later run and a restarted SuperNode find it. It holds the main model,
the client's own seed model and the seed models its neighbours sent, with the
architectures they were built with. The seed model is the only thing that leaves the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from .. import protocol
from ..config import field_name
from ..core.hdus import distill_seed, ensemble_probabilities, reference_and_evaluation
from ..core.models import ModelSpec, StateDict, build_model
from ..core.training import make_optimizer, train_epochs
from ..errors import StoreError
from .run import ClientRun
from .store import check_identity, read_checked, write_checked

SUFFIX = ".hdus"


@dataclass
class Repository:
    """What a client keeps: its main model, its seed model and the neighbours' seed models."""

    main_spec: ModelSpec
    seed_spec: ModelSpec
    main: StateDict
    seed: StateDict
    neighbours: dict[int, StateDict] = field(default_factory=dict)


def repository_file(client: ClientRun) -> Path:
    """Where this client's repository lives."""
    return client.config.store_path / client.config.experiment / f"partition-{client.node.partition_id}{SUFFIX}"


def _identity(client: ClientRun) -> dict[str, Any]:
    config = client.config
    return {"dataset": config.dataset, "experiment": config.experiment, "partition-id": client.node.partition_id,
            "num-partitions": client.node.num_partitions, "partitioning": config.partitioning, "alpha": config.alpha,
            "seed": config.seed}


def save_repository(client: ClientRun, repository: Repository) -> int:
    """Write the repository atomically; returns its size in bytes."""
    tensors = {f"main/{key}": value for key, value in repository.main.items()}
    tensors |= {f"seed/{key}": value for key, value in repository.seed.items()}
    for partition, state in repository.neighbours.items():
        tensors |= {f"neighbour-{partition}/{key}": value for key, value in state.items()}
    metadata = {**_identity(client), "main-model": repository.main_spec.as_dict(),
                "seed-model": repository.seed_spec.as_dict(), "neighbours": sorted(repository.neighbours)}
    return write_checked(repository_file(client), {k: v.detach().cpu() for k, v in tensors.items()}, metadata)


def load_repository(client: ClientRun) -> Repository:
    """The client's repository, refused if missing, corrupt or made for another setup."""
    path = repository_file(client)
    tensors, metadata = read_checked(path)
    check_identity(path, metadata, _identity(client), "repository")

    def part(prefix: str) -> StateDict:
        return {key[len(prefix) + 1:]: value for key, value in tensors.items() if key.startswith(prefix + "/")}

    return Repository(ModelSpec(**metadata["main-model"]), ModelSpec(**metadata["seed-model"]), part("main"), part("seed"),
                      {int(p): part(f"neighbour-{p}") for p in metadata["neighbours"]})


def stored_model(spec: ModelSpec, state: StateDict, device: torch.device) -> nn.Module:
    """A model of ``spec`` holding ``state``, on ``device``."""
    model = build_model(spec)
    model.load_state_dict(state)
    return model.to(device)


def _settings(client: ClientRun, config: ConfigRecord):
    """The run config as the message's HDUS settings say (they travel in every HDUS message)."""
    changes = {field_name(key): config[key] for key in protocol.HDUS_SETTINGS if key in config}
    return client.config.replace(**changes)


def main_architecture(client: ClientRun) -> tuple[str, ModelSpec]:
    """This client's main-model architecture, by name and spec: ``client-model`` of its node,
    else its entry of ``client-models``, else the run's ``model`` (named ``model``)."""
    name = client.config.client_model(client.node.partition_id)
    return (name, ModelSpec.from_architecture(name, client.config)) if name else ("model", client.model_spec)


def train_seed(client: ClientRun, config: ConfigRecord) -> RecordDict:
    """Train the main model on the client's data, distil the seed model on the reference set,
    start a new repository (no neighbour's seed model yet); reply with the seed model."""
    settings = _settings(client, config)
    architecture, main_spec = main_architecture(client)
    main = build_model(main_spec, seed=1000 * (settings.seed + 1) + client.node.partition_id)
    main = main.to(client.device)
    stats = train_epochs(
        main, client.train_data, optimizer=make_optimizer(main, settings.lr, settings.momentum, settings.weight_decay),
        epochs=settings.hdus_epochs, batch_size=settings.batch_size, generator=client.generator(config, 7),
        device=client.device,
    )
    reference, _ = reference_and_evaluation(settings)
    seed_spec = ModelSpec.from_architecture(settings.hdus_seed_model, settings)
    seed = build_model(seed_spec, seed=settings.seed).to(client.device)
    loss = distill_seed(main, seed, reference.images, epochs=settings.hdus_distill_epochs, lr=settings.hdus_distill_lr,
                        batch_size=settings.batch_size, temperature=settings.hdus_temperature,
                        generator=client.generator(config, 8), device=client.device)
    repository = Repository(main_spec, seed_spec, main.state_dict(), seed.state_dict())
    store_bytes = save_repository(client, repository)
    metrics = MetricRecord({
        protocol.NUM_EXAMPLES: len(client.train_data),
        protocol.SAMPLE_GRADIENTS: stats.sample_gradients + settings.hdus_distill_epochs * len(reference),
        protocol.TRAIN_LOSS: stats.mean_loss, "distill-loss": loss, protocol.STORE_BYTES: store_bytes,
    })
    return RecordDict({protocol.ARRAYS: ArrayRecord(seed.state_dict()), protocol.METRICS: metrics,
                       protocol.DESCRIPTION: ConfigRecord({protocol.MAIN_MODEL: architecture})})


def keep_seeds(client: ClientRun, content: RecordDict) -> RecordDict:
    """Add the neighbours' seed models of the message (records ``seed-<partition>``) to the repository."""
    repository = load_repository(client)
    for name, record in content.array_records.items():
        partition = int(name.removeprefix("seed-"))
        state = record.to_torch_state_dict()
        try:
            stored_model(repository.seed_spec, state, torch.device("cpu"))
        except RuntimeError as exc:
            raise StoreError(f"the seed model of partition {partition} is not a {repository.seed_spec.name} of this "
                             "run's hdus-seed-model: every client of a run distils the same seed architecture") from exc
        repository.neighbours[partition] = state
    return _held(repository, save_repository(client, repository))


def drop_seeds(client: ClientRun, config: ConfigRecord) -> RecordDict:
    """Delete the seed models of the partitions the message names; a client named itself
    deletes its whole repository (its main model and seed model too). A client without a
    repository holds nothing to delete; one that holds none of them is left as it is."""
    dropped = {int(p) for p in config[protocol.DROP_PARTITIONS]}
    path = repository_file(client)
    if client.node.partition_id in dropped:
        existed = path.is_file()
        path.unlink(missing_ok=True)
        return _held(None, 0, [client.node.partition_id] if existed else [])
    if not path.is_file():
        return _held(None, 0, [])
    repository = load_repository(client)
    removed = sorted(set(repository.neighbours) & dropped)
    if not removed:
        return _held(repository, path.stat().st_size, [])
    repository.neighbours = {p: s for p, s in repository.neighbours.items() if p not in dropped}
    return _held(repository, save_repository(client, repository), removed)


def _held(repository: Repository | None, store_bytes: int, removed: list[int] | None = None) -> RecordDict:
    held = sorted(repository.neighbours) if repository else []
    return RecordDict({protocol.METRICS: MetricRecord({protocol.SEEDS_HELD: held, protocol.SEEDS_DROPPED: removed or [],
                                                       protocol.STORE_BYTES: store_bytes,
                                                       protocol.SAMPLE_GRADIENTS: 0})})


def ensemble_outputs(client: ClientRun, repository: Repository, images: torch.Tensor,
                     weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of the main model alone and of the ensemble of the repository on ``images``."""
    main = stored_model(repository.main_spec, repository.main, client.device)
    seeds = [stored_model(repository.seed_spec, state, client.device)
             for _, state in sorted(repository.neighbours.items())]
    return ensemble_probabilities(main, seeds, images, weight, client.config.eval_batch_size, client.device)


def evaluate_ensemble(client: ClientRun, config: ConfigRecord) -> RecordDict:
    """Test accuracy of the main model alone and of the ensemble (the test images not in the reference set)."""
    settings = _settings(client, config)
    repository = load_repository(client)
    _, test = reference_and_evaluation(settings)
    main, ensemble = ensemble_outputs(client, repository, test.images, settings.hdus_lambda)
    correct = ensemble.argmax(dim=1) == test.labels
    num_classes = client.num_classes
    metrics = MetricRecord({
        protocol.NUM_EXAMPLES: len(test), protocol.SAMPLE_GRADIENTS: 0,
        protocol.MAIN_ACCURACY: float((main.argmax(dim=1) == test.labels).float().mean()),
        protocol.ENSEMBLE_ACCURACY: float(correct.float().mean()),
        protocol.CLASS_CORRECT: torch.bincount(test.labels[correct], minlength=num_classes).tolist(),
        protocol.COUNTS: test.class_counts(num_classes), protocol.SEEDS_HELD: sorted(repository.neighbours),
    })
    return RecordDict({protocol.METRICS: metrics})
