"""Unlearning, recovery and relearning on a client's synthetic store (plain torch).

- Unlearning: stochastic gradient *ascent* on the synthetic forget data,
  theta <- theta + lr * grad L (QuickDrop Sec. 3.4, step 3).
- Recovery: SGD on the synthetic retain data plus the real augmentation samples
  stored with it (Sec. 3.3.1), classes still forgotten excluded.
- Relearning: SGD on the synthetic data with the relearned classes or client back
  in, together with the retain data, so the other classes keep their accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from .data import LabeledImages
from .distillation import SyntheticSet
from .training import TrainStats, logits, train_epochs

FORGET_PROBABILITY = 0.001
LOSS_CAP = -math.log(FORGET_PROBABILITY)  # a sample's loss counts up to this: the loss of a forgotten one
GOAL_BATCH = 1024
GOAL_SAMPLES = 1024  # real samples a client-level ascent's goal is judged on
UNSEEN_QUANTILES = 21  # loss quantiles per class that describe unseen data (every 5 %)
RANK_MARGIN = 2.0  # standard errors below 0.5 at which a client's data fits better than unseen data

AscentGoal = Callable[[torch.nn.Module, LabeledImages, torch.device], bool]


def capped_losses(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's cross-entropy, counted up to LOSS_CAP."""
    return torch.nn.functional.cross_entropy(outputs, labels, reduction="none").clamp(max=LOSS_CAP)


def class_loss_quantiles(outputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         count: int = UNSEEN_QUANTILES) -> list[float]:
    """``count`` evenly spaced quantiles (0 to 100 %) of each class's :func:`capped_losses`,
    class after class in one flat list (NaN for a class with no samples)."""
    losses = capped_losses(outputs, labels).double()
    levels = torch.linspace(0, 1, count, dtype=torch.float64)
    table = [torch.quantile(losses[labels == c], levels) if bool((labels == c).any())
             else torch.full((count,), math.nan, dtype=torch.float64) for c in range(num_classes)]
    return torch.stack(table).flatten().tolist()


def _outputs(model: torch.nn.Module, data: LabeledImages, device: torch.device) -> torch.Tensor:
    outputs = logits(model, data.images, GOAL_BATCH, device)
    model.train()
    return outputs


def forgotten(model: torch.nn.Module, data: LabeledImages, device: torch.device = torch.device("cpu")) -> bool:
    """Whether the model has forgotten ``data``: its mean probability for the true
    class is below FORGET_PROBABILITY (the goal of class-level ascent)."""
    probabilities = torch.softmax(_outputs(model, data, device), dim=1)
    return float(probabilities[torch.arange(len(data)), data.labels].mean()) < FORGET_PROBABILITY


def fits_like_unseen(unseen_quantiles: Sequence[float], num_classes: int) -> AscentGoal:
    """The goal of client-level ascent: the client's real samples fit no better than data
    the model never trained on. ``unseen_quantiles`` are :func:`class_loss_quantiles` of
    the model on unseen (test) data. Each sample is ranked within its class: the fraction
    of those quantiles below its loss, 0.5 on average for a sample drawn like the unseen
    data. The goal holds once the mean rank is no longer significantly below 0.5 (by
    RANK_MARGIN standard errors of a mean of n uniform ranks): a loss-threshold
    membership attack then cannot tell the client's data from unseen data. Samples of a
    class with no unseen data do not count."""
    table = torch.tensor(list(unseen_quantiles), dtype=torch.float64).view(num_classes, -1)

    def reached(model: torch.nn.Module, data: LabeledImages, device: torch.device) -> bool:
        losses = capped_losses(_outputs(model, data, device), data.labels).double()
        rows = table[data.labels]
        known = ~rows.isnan().any(dim=1)
        if not bool(known.any()):
            return True
        ranks = (rows[known] < losses[known, None]).double().mean(dim=1)
        return float(ranks.mean()) >= 0.5 - RANK_MARGIN / math.sqrt(12 * len(ranks))

    return reached


def gradient_ascent(  # pylint: disable=too-many-arguments
    model: torch.nn.Module,
    data: LabeledImages,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device = torch.device("cpu"),
    goal: AscentGoal | None = forgotten,
    goal_data: LabeledImages | None = None,
) -> TrainStats:
    """SGA: maximise the cross-entropy on ``data`` (each step moves up the gradient).

    Ascent is unbounded, and how much of it the data needs varies a lot. Two bounds keep
    the damage to the rest, which recovery must repair, as small as the goal allows.
    Each sample's loss counts only up to LOSS_CAP: a forgotten sample stops pulling, so
    samples that resist (or a class the ascent pushes the others into) cannot drive the
    weights off without limit. And the ascent stops as soon as ``goal`` holds (checked
    before the first step, so data already there takes none), ``epochs`` being the upper
    bound; ``None`` runs the ``epochs`` in full. The goal is judged on ``goal_data``
    (default: ``data`` itself), e.g. real samples while the ascent runs on synthetic ones.
    """
    judged = data if goal_data is None else goal_data

    def reached() -> bool:
        return goal is not None and goal(model, judged, device)

    if reached():
        return TrainStats()
    return train_epochs(
        model, data, optimizer=optimizer, epochs=epochs, batch_size=batch_size, generator=generator,
        device=device, ascent=True, loss_cap=LOSS_CAP, stop_when=reached if goal is not None else None,
    )


def _select(images: LabeledImages, keep: torch.Tensor) -> LabeledImages:
    return LabeledImages(images.images[keep], images.labels[keep])


def _in(labels: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    return torch.isin(labels, torch.tensor(sorted(classes), dtype=labels.dtype))


def forget_data(store: SyntheticSet, classes: Iterable[int] | None) -> LabeledImages:
    """Synthetic images of ``classes`` (all of them for ``None``: client-level forgetting)."""
    synthetic = store.synthetic
    if classes is None:
        return synthetic
    return _select(synthetic, _in(synthetic.labels, classes))


def _concat(parts: list[LabeledImages]) -> LabeledImages:
    return LabeledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def retain_data(store: SyntheticSet, excluded_classes: Iterable[int]) -> LabeledImages:
    """Synthetic images and real augmentation samples of every class not excluded."""
    excluded = list(excluded_classes)
    return _concat([_select(part, ~_in(part.labels, excluded)) for part in (store.synthetic, store.augmentation)])


def relearn_data(store: SyntheticSet, relearned_classes: Iterable[int], excluded_classes: Iterable[int]) -> LabeledImages:
    """Retain data with the relearned classes back in, their samples repeated so that each
    relearned class the client holds weighs half as much as all the other data (tuned on
    the CPU preset for one class, which then makes up about a third: without repeats a
    class held by few clients came back to 84 % only; at one half the other classes lost
    up to 4 points; two classes sharing that third came back to 83 and 98 %)."""
    relearned = set(relearned_classes)
    data = retain_data(store, excluded_classes)
    back = _in(data.labels, relearned)
    others = int((~back).sum())
    if not relearned or not bool(back.any()) or others == 0:
        return data
    held = len(torch.unique(data.labels[back]))
    repeats = max(1, round(held * others / (2 * int(back.sum()))))
    return _concat([_select(data, ~back)] + [_select(data, back)] * repeats)
