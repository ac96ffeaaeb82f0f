"""HDUS (Ye et al. 2023): seed models distilled from each client's main model, and the ensembles
that make client unlearning exact.

Each client trains its own main model on its own data, then distils a small seed model of a
shared architecture from it on a reference set that holds no client data:
``min KL(softmax(main(x) / T) || softmax(seed(x) / T))`` over the reference images. Seed models
go to the client's neighbours in a fixed graph; client i predicts with

    p_i(x) = lambda * softmax(main_i(x)) + (1 - lambda) * mean_{j held} softmax(seed_j(x)).

All of client j's knowledge lives in its seed model, so forgetting j is deleting that seed
model: the ensemble becomes exactly the one that never held it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RunConfig, invalid
from .data import LabeledImages, dataset_spec, load_split
from .training import make_optimizer

# the dataset of the same image format each dataset's `hdus-reference=other` draws from
OTHER_DATASET = {"mnist": "fashion-mnist", "fashion-mnist": "mnist", "cifar10": "svhn", "svhn": "cifar10"}


def neighbours(num_partitions: int, topology: str, degree: int) -> dict[int, list[int]]:
    """Each partition's neighbours: ``ring`` (the two next to it), ``regular`` (``degree``
    nearest on the ring, and the opposite one for an odd degree) or ``full`` (every other).
    The graph is undirected; a federation smaller than the degree is fully connected."""
    if topology == "full" or num_partitions - 1 <= (2 if topology == "ring" else degree):
        return {i: [j for j in range(num_partitions) if j != i] for i in range(num_partitions)}
    reach = 1 if topology == "ring" else degree // 2
    graph: dict[int, set[int]] = {i: set() for i in range(num_partitions)}
    for i in range(num_partitions):
        for step in range(1, reach + 1):
            graph[i] |= {(i + step) % num_partitions, (i - step) % num_partitions}
        if topology == "regular" and degree % 2 and num_partitions % 2 == 0:
            graph[i].add((i + num_partitions // 2) % num_partitions)
    return {i: sorted(graph[i]) for i in graph}


def reference_and_evaluation(config: RunConfig) -> tuple[LabeledImages, LabeledImages]:
    """The reference set of ``hdus-reference`` and the test data clients are evaluated on.

    ``holdout``: ``hdus-reference-size`` test images drawn by ``seed``, then left out of the
    evaluation; ``other``: as many images of :data:`OTHER_DATASET` (its test split), in this
    dataset's normalisation; ``noise``: uniform random pixels. Labels are never used.
    """
    test = load_split(config.dataset, config.data_path, False)
    size, generator = config.hdus_reference_size, torch.Generator().manual_seed(config.seed)
    spec = dataset_spec(config.dataset)
    if config.hdus_reference == "holdout":
        if size >= len(test):
            raise invalid("hdus-reference-size", size, f"must be below the {config.dataset} test split's "
                          f"{len(test)} images with hdus-reference=holdout (the rest are evaluated on)")
        order = torch.randperm(len(test), generator=generator)
        return test.subset(order[:size]), test.subset(order[size:])
    if config.hdus_reference == "other":
        other = load_split(OTHER_DATASET[config.dataset], config.data_path, False)
        if size > len(other):
            raise invalid("hdus-reference-size", size, f"must be at most the {OTHER_DATASET[config.dataset]} test "
                          f"split's {len(other)} images with hdus-reference=other")
        source = dataset_spec(OTHER_DATASET[config.dataset])
        chosen = other.subset(torch.randperm(len(other), generator=generator)[:size])
        pixels = chosen.images * _column(source.std) + _column(source.mean)
        return LabeledImages(spec.normalise_pixels(pixels), chosen.labels), test
    pixels = torch.rand(size, spec.channels, spec.image_size, spec.image_size, generator=generator)
    return LabeledImages(spec.normalise_pixels(pixels), torch.zeros(size, dtype=torch.long)), test


def _column(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, 1, 1)


def distill_seed(teacher: nn.Module, student: nn.Module, images: torch.Tensor, *, epochs: int, lr: float,
                 batch_size: int, temperature: float, generator: torch.Generator, device: torch.device) -> float:
    """Train ``student`` to match ``teacher``'s softened outputs on ``images`` (KL at
    ``temperature``, scaled by T^2 as usual); returns the last epoch's mean loss."""
    teacher.eval()
    with torch.no_grad():
        targets = torch.cat([nn.functional.log_softmax(teacher(batch.to(device)) / temperature, dim=1)
                             for batch in images.split(500)])
    student.train()
    optimizer = make_optimizer(student, lr, momentum=0.9, weight_decay=0.0)
    mean_loss = math.nan
    for _ in range(epochs):
        total, order = 0.0, torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            outputs = nn.functional.log_softmax(student(images[batch].to(device)) / temperature, dim=1)
            loss = nn.functional.kl_div(outputs, targets[batch.to(targets.device)], log_target=True,
                                        reduction="batchmean") * temperature ** 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        mean_loss = total / max(len(images), 1)
    return mean_loss


@torch.no_grad()
def ensemble_probabilities(main: nn.Module, seeds: list[nn.Module], images: torch.Tensor, weight: float,
                           batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities of the main model alone and of the ensemble (``weight`` = lambda on
    the main model; with no seed model held the ensemble is the main model alone)."""
    models = [main, *seeds]
    for model in models:
        model.eval()
    main_parts, ensemble_parts = [], []
    for batch in images.split(batch_size):
        batch = batch.to(device)
        own = nn.functional.softmax(main(batch), dim=1)
        ensemble = own
        if seeds:
            others = torch.stack([nn.functional.softmax(seed(batch), dim=1) for seed in seeds]).mean(dim=0)
            ensemble = weight * own + (1.0 - weight) * others
        main_parts.append(own.cpu())
        ensemble_parts.append(ensemble.cpu())
    return torch.cat(main_parts), torch.cat(ensemble_parts)
