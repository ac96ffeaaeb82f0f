"""Dataset distillation by gradient matching, in situ with local SGD (QuickDrop, Alg. 2).

Each client keeps a per-class synthetic set S^c of ceil(|D^c| / scale) images,
initialised once from random real images of class c. At every local SGD step the
real batch is split by class; the per-class gradients g_c of the mean loss on each
class's samples are computed once and used twice: their sample-weighted sum is the
model's SGD update (exactly the batch-mean gradient), and each g_c is the target the
synthetic images of class c are matched to with the layer-wise distance of Zhao et
al. (DC), one SGD step on the images per model step.

Plain torch; no Flower.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .data import LabeledImages
from .matching import matching_distance
from .models import ModelSpec, build_model
from .training import TrainStats, device_batches

@dataclass
class SyntheticSet:
    """A client's distilled images and the real augmentation samples stored beside them.

    Both are ``LabeledImages`` in the dataset's normalised space. The augmentation
    samples are real images with the same per-class counts as the synthetic ones
    (QuickDrop Sec. 3.3.1), used in recovery.
    """

    synthetic: LabeledImages
    augmentation: LabeledImages

    def classes(self) -> list[int]:
        """Classes with at least one synthetic image."""
        return sorted(set(self.synthetic.labels.tolist()))

    def class_counts(self, num_classes: int) -> list[int]:
        """Synthetic images per class."""
        return self.synthetic.class_counts(num_classes)


def synthetic_count(class_size: int, scale: int) -> int:
    """|S^c| = ceil(|D^c| / s): at least one image for every class the client holds."""
    return math.ceil(class_size / scale)


def initial_synthetic_set(data: LabeledImages, scale: int, generator: torch.Generator) -> SyntheticSet:
    """Pick ceil(|D^c| / scale) random real images per class as the synthetic set, and as
    many further real images (disjoint where the class is large enough) as augmentation."""
    synthetic_index, augmentation_index = [], []
    for cls in sorted(set(data.labels.tolist())):
        members = torch.nonzero(data.labels == cls).flatten()
        count = synthetic_count(len(members), scale)
        order = members[torch.randperm(len(members), generator=generator)]
        synthetic_index.append(order[:count])
        rest = order[count:] if len(order) >= 2 * count else order
        augmentation_index.append(rest[:count])
    if not synthetic_index:
        empty = LabeledImages(data.images[:0].clone(), data.labels[:0].clone())
        return SyntheticSet(empty, empty)
    synthetic = data.subset(torch.cat(synthetic_index))
    augmentation = data.subset(torch.cat(augmentation_index))
    return SyntheticSet(
        LabeledImages(synthetic.images.clone(), synthetic.labels.clone()),
        LabeledImages(augmentation.images.clone(), augmentation.labels.clone()),
    )


def nearest_real_distances(synthetic: torch.Tensor, real: torch.Tensor, std: Sequence[float],
                           chunk: int = 4096) -> torch.Tensor:
    """For each synthetic image, the root-mean-square pixel difference (pixels in [0, 1]) to
    the closest real image: how far the distilled images moved from the data they summarise
    (0: an exact copy). Both sets are in the dataset's normalised space, scaled by ``std``.

    The closest image is found in float32 blocks of ``chunk`` real images (memory stays
    bounded); its distance is then computed exactly, so a copy gives 0.
    """
    if len(synthetic) == 0 or len(real) == 0:
        return torch.zeros(0, dtype=torch.float64)
    scale = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    flat_synthetic = (synthetic.detach().cpu().double() * scale).flatten(1)
    best = torch.full((len(synthetic),), math.inf)
    closest = torch.zeros(len(synthetic), dtype=torch.long)
    for start in range(0, len(real), chunk):
        block = (real[start:start + chunk].detach().cpu().double() * scale).flatten(1)
        low, where = torch.cdist(flat_synthetic.float(), block.float()).min(dim=1)
        better = low < best
        best[better], closest[better] = low[better], where[better] + start
    nearest = (real[closest].detach().cpu().double() * scale).flatten(1)
    return (flat_synthetic - nearest).norm(dim=1) / math.sqrt(flat_synthetic.shape[1])


@dataclass
class DistillStats(TrainStats):
    """Local training with distillation: SGD stats plus the matching work done."""

    matching_steps: int = 0
    distance_sum: float = 0.0
    distill_seconds: float = 0.0

    @property
    def mean_distance(self) -> float:
        """Mean gradient distance over the class matchings performed."""
        return self.distance_sum / self.matching_steps if self.matching_steps else 0.0


class DeviceTimer:
    """Adds up the time of marked spans of device work without stopping the device at each:
    on CUDA, events recorded in the stream and read once at the end; on CPU, the clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cpu_seconds = 0.0
        self._started: float | torch.cuda.Event = 0.0

    def start(self) -> None:
        """Mark the start of a span."""
        if self.cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record(torch.cuda.current_stream(self.device))
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        """Mark the end of the span started last."""
        if self.cuda:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(torch.cuda.current_stream(self.device))
            self.spans.append((self._started, ended))
        else:
            self.cpu_seconds += time.perf_counter() - self._started

    @property
    def seconds(self) -> float:
        """Total seconds of the spans (on CUDA: waits for them to finish)."""
        if not self.spans:
            return self.cpu_seconds
        torch.cuda.synchronize(self.device)
        return sum(start.elapsed_time(end) for start, end in self.spans) / 1000


def train_with_distillation(  # pylint: disable=too-many-arguments,too-many-locals
    model: nn.Module,
    data: LabeledImages,
    synthetic: SyntheticSet,
    *,
    optimizer: torch.optim.Optimizer,
    image_lr: float,
    image_momentum: float,
    image_batch: int,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    max_steps: int = 0,
    device: torch.device = torch.device("cpu"),
    batched: bool = True,
) -> DistillStats:
    """Local SGD on ``data`` that also distils it into ``synthetic`` (updated in place).

    Every step: per-class gradients of the real batch update the model (their
    sample-weighted sum) and are the matching targets of that class's synthetic
    images, which take one SGD step (``image_lr``, ``image_momentum``) on the summed
    class-wise distance. ``distill_seconds`` times that synthetic-image work (lines 14-15
    of the paper's Algorithm 2), the overhead over plain FedAvg the paper's Table 6 reports.
    ``batched``: see :func:`~qd_app.core.matching.matching_distance` (same result either way).
    """
    stats = DistillStats()
    if len(data) == 0:
        return stats
    params = [p for p in model.parameters() if p.requires_grad]
    class_images = _class_leaves(synthetic.synthetic, device)
    image_optimizer = torch.optim.SGD(list(class_images.values()), lr=image_lr, momentum=image_momentum)
    loss_sum, distance_sum, timer = torch.zeros((), device=device), torch.zeros((), device=device), DeviceTimer(device)
    model.train()
    for batch, images, labels in device_batches(data, batch_size, epochs, max_steps, generator, device):
        batch_labels = data.labels[batch]  # the class split on the host (no device sync)
        update = [torch.zeros_like(p) for p in params]
        classes, chosen, targets = [], [], []
        for cls in batch_labels.unique().tolist():
            members = torch.nonzero(batch_labels == cls).flatten()
            count = len(members)
            members = members.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(images[members]), labels[members])
            class_grads = torch.autograd.grad(loss, params)
            for total, grad in zip(update, class_grads):
                total.add_(grad, alpha=count / len(batch))
            loss_sum += loss.detach() * count
            if cls in class_images:
                classes.append(cls)
                chosen.append(torch.randperm(len(class_images[cls]), generator=generator)[:image_batch])
                targets.append(class_grads)
        if classes:
            timer.start()
            leaves = [class_images[cls] for cls in classes]
            selections = [leaf[order.to(device, non_blocking=True)] for leaf, order in zip(leaves, chosen)]
            distance = matching_distance(model, classes, selections, targets, batched)
            image_optimizer.zero_grad(set_to_none=True)
            for leaf, grad in zip(leaves, torch.autograd.grad(distance, leaves)):
                leaf.grad = grad
            image_optimizer.step()
            distance_sum += distance.detach()
            timer.stop()
            stats.matching_steps += len(leaves)
            stats.sample_gradients += sum(len(order) for order in chosen)
        optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(params, update):
            param.grad = grad
        optimizer.step()
        stats.steps += 1
        stats.sample_gradients += len(batch)
    stats.loss_sum, stats.distance_sum, stats.distill_seconds = float(loss_sum), float(distance_sum), timer.seconds
    _write_back(synthetic, class_images)
    return stats


def _class_leaves(images: LabeledImages, device: torch.device) -> dict[int, torch.Tensor]:
    """One optimisable leaf tensor per class (classes not in a batch get no update)."""
    return {
        cls: images.images[images.labels == cls].to(device).clone().requires_grad_(True)
        for cls in sorted(set(images.labels.tolist()))
    }


def _write_back(synthetic: SyntheticSet, class_images: dict[int, torch.Tensor]) -> None:
    images = synthetic.synthetic.images
    for cls, leaf in class_images.items():
        images[synthetic.synthetic.labels == cls] = leaf.detach().to(images.device)


FINETUNE_INNER_STEPS = 50


def finetune_synthetic(  # pylint: disable=too-many-arguments,too-many-locals
    synthetic_set: SyntheticSet,
    data: LabeledImages,
    model_spec: ModelSpec,
    *,
    steps: int,
    image_lr: float,
    image_momentum: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device = torch.device("cpu"),
    inner_steps: int = FINETUNE_INNER_STEPS,
) -> int:
    """Optional fine-tuning of the synthetic set by standard DC (QuickDrop Sec. 3.3.2).

    Each of ``steps`` outer steps draws a freshly initialised network (matching for
    generalisation across initialisations) and runs ``inner_steps`` (paper: 50) steps: match every
    class's synthetic gradient to a real batch of that class, update the images, then
    train the network one SGD step on the synthetic set. Returns the number of
    per-sample gradients computed.
    """
    class_images = _class_leaves(synthetic_set.synthetic, device)
    if not class_images:
        return 0
    image_optimizer = torch.optim.SGD(list(class_images.values()), lr=image_lr, momentum=image_momentum)
    members = {cls: torch.nonzero(data.labels == cls).flatten() for cls in class_images}
    sample_gradients = 0
    for _ in range(steps):
        model = build_model(model_spec, seed=int(torch.randint(2**31, (1,), generator=generator))).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        model_optimizer = torch.optim.SGD(params, lr=0.01)
        for _ in range(inner_steps):
            real_grads = []
            for cls in class_images:
                chosen = members[cls][torch.randperm(len(members[cls]), generator=generator)[:batch_size]]
                targets = torch.full((len(chosen),), cls, dtype=torch.long, device=device)
                real_loss = nn.functional.cross_entropy(model(data.images[chosen].to(device)), targets)
                real_grads.append(torch.autograd.grad(real_loss, params))
                sample_gradients += len(chosen) + len(class_images[cls])
            leaves = list(class_images.values())
            distance = matching_distance(model, list(class_images), leaves, real_grads)
            image_optimizer.zero_grad(set_to_none=True)
            for leaf, grad in zip(leaves, torch.autograd.grad(distance, leaves)):
                leaf.grad = grad
            image_optimizer.step()
            images = torch.cat([leaf.detach() for leaf in leaves])
            labels = torch.cat([torch.full((len(leaf),), cls, device=device) for cls, leaf in class_images.items()])
            model_optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            model_optimizer.step()
            sample_gradients += len(images)
    _write_back(synthetic_set, class_images)
    return sample_gradients
