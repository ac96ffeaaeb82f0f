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
from collections.abc import Iterable

import torch

from .data import LabeledImages
from .distillation import SyntheticSet
from .training import TrainStats, train_epochs

FORGET_PROBABILITY = 0.001


def forgotten(model: torch.nn.Module, data: LabeledImages, device: torch.device = torch.device("cpu")) -> bool:
    """Whether the model has forgotten ``data``: its mean probability for the true
    class is below FORGET_PROBABILITY."""
    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(data.images.to(device)), dim=1)
    model.train()
    true_class = probabilities[torch.arange(len(data)), data.labels.to(device)]
    return float(true_class.mean()) < FORGET_PROBABILITY


def gradient_ascent(  # pylint: disable=too-many-arguments
    model: torch.nn.Module,
    data: LabeledImages,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device = torch.device("cpu"),
    stop_when_forgotten: bool = True,
) -> TrainStats:
    """SGA: maximise the cross-entropy on ``data`` (each step moves up the gradient).

    Ascent is unbounded, and how much of it a class needs varies a lot. Two bounds keep
    the damage to the other classes, which recovery must repair, as small as
    forgetting allows. Each sample's loss counts only up to -log(FORGET_PROBABILITY):
    a forgotten sample stops pulling, so samples that resist (or a class the ascent
    pushes the others into) cannot drive the weights off without limit. And with
    ``stop_when_forgotten`` the client stops as soon as its forget data is
    :func:`forgotten` (and takes no step if it is already), ``epochs`` being the upper
    bound.
    """

    def data_forgotten() -> bool:
        return forgotten(model, data, device)

    if stop_when_forgotten and data_forgotten():
        return TrainStats()
    return train_epochs(
        model, data, optimizer=optimizer, epochs=epochs, batch_size=batch_size, generator=generator,
        device=device, ascent=True, loss_cap=-math.log(FORGET_PROBABILITY),
        stop_when=data_forgotten if stop_when_forgotten else None,
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
    """Retain data with the relearned classes back in, their samples repeated to make up
    about a third of it (tuned on the CPU preset: without repeats a class held by few
    clients came back to 84 % only; at one half the other classes lost up to 4 points)."""
    relearned = set(relearned_classes)
    data = retain_data(store, excluded_classes)
    back = _in(data.labels, relearned)
    others = int((~back).sum())
    if not relearned or not bool(back.any()) or others == 0:
        return data
    repeats = max(1, round(others / (2 * int(back.sum()))))
    return _concat([_select(data, ~back)] + [_select(data, back)] * repeats)
