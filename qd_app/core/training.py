"""Local SGD and evaluation: plain torch functions, no Flower.

Local work is counted in epochs over the data a stage touches (optionally capped
by a number of steps), so the cost of a stage scales with its data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..config import invalid
from .data import LabeledImages


def resolve_device(setting: str) -> torch.device:
    """The torch device for a ``device`` setting (``auto`` picks CUDA when present)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise invalid("device", setting, "CUDA is not available on this machine; use auto or cpu")
    return torch.device(setting)


@dataclass
class TrainStats:
    """What a local training run did."""

    steps: int = 0
    sample_gradients: int = 0
    loss_sum: float = 0.0

    @property
    def mean_loss(self) -> float:
        """Mean training loss over the samples seen (0 when none)."""
        return self.loss_sum / self.sample_gradients if self.sample_gradients else 0.0


def batch_indices(
    num_samples: int, batch_size: int, epochs: int, max_steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Shuffled mini-batch indices for ``epochs`` passes, stopping after ``max_steps`` (0: no cap)."""
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        for start in range(0, num_samples, batch_size):
            if max_steps and steps >= max_steps:
                return
            steps += 1
            yield order[start : start + batch_size]


def device_batches(
    data: LabeledImages, batch_size: int, epochs: int, max_steps: int, generator: torch.Generator,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`batch_indices` of ``data`` with each batch's images and labels on ``device``: the data
    go to the device once and batches are indexed there (no copy or device sync per step)."""
    all_images, all_labels = data.images.to(device, non_blocking=True), data.labels.to(device, non_blocking=True)
    for batch in batch_indices(len(data), batch_size, epochs, max_steps, generator):
        on_device = batch.to(device, non_blocking=True)
        yield batch, all_images[on_device], all_labels[on_device]


def make_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.SGD:
    """The SGD optimiser every stage uses."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epochs(  # pylint: disable=too-many-arguments
    model: nn.Module,
    data: LabeledImages,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    max_steps: int = 0,
    device: torch.device = torch.device("cpu"),
    ascent: bool = False,
    loss_cap: float | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> TrainStats:
    """Minimise cross-entropy on ``data`` with ``optimizer`` for ``epochs`` passes.

    With ``ascent`` the optimiser follows the gradient upwards instead (maximises the
    loss): the stochastic gradient ascent of unlearning. With ``loss_cap`` a sample's
    loss counts only up to that value, so samples past it give no gradient. ``stop_when``
    is checked after every step; training ends early once it returns True.
    """
    stats = TrainStats()
    if len(data) == 0:
        return stats
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    model.train()
    for batch, images, labels in device_batches(data, batch_size, epochs, max_steps, generator, device):
        optimizer.zero_grad(set_to_none=True)
        losses = nn.functional.cross_entropy(model(images), labels, reduction="none")
        objective = (losses if loss_cap is None else losses.clamp(max=loss_cap)).mean()
        (-objective if ascent else objective).backward()
        optimizer.step()
        stats.steps += 1
        stats.sample_gradients += len(batch)
        loss_sum += losses.detach().sum()
        if stop_when is not None and stop_when():
            break
    stats.loss_sum = float(loss_sum)
    return stats


@torch.no_grad()
def logits(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device = torch.device("cpu")
) -> torch.Tensor:
    """The model's outputs for every image, in eval mode, batch by batch (on CPU)."""
    model.eval()
    outputs = [
        model(images[start : start + batch_size].to(device)).cpu() for start in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.empty(0, 0)


def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device = torch.device("cpu")
) -> torch.Tensor:
    """Predicted class of every image (on CPU)."""
    outputs = logits(model, images, batch_size, device)
    return outputs.argmax(dim=1) if len(outputs) else torch.empty(0, dtype=torch.long)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy on each class; NaN for a class with no samples."""
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    totals = torch.bincount(labels, minlength=num_classes).double()
    return (correct / totals).tolist()


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from several integers (seed, round, partition, ...)."""
    generator = torch.Generator()
    generator.manual_seed(hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator
