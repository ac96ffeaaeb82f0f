"""Data-free class unlearning (ISPF, Zhang et al. 2025, and its baselines), plain torch.

The trained model is the teacher. A generator learns to synthesise images the teacher
classifies confidently and the student does not yet imitate; a fresh student learns the
teacher's outputs on them, without the forgotten classes. Two choices make the variants:

- the generator's adversarial term: *plain* (maximise teacher-student disagreement on every
  class, as in data-free distillation) or *inhibited* (IS: maximise it on the retained
  classes, minimise it on the forgotten ones, so fewer forget-class images are made);
- what the student learns from a generated batch: a *gate* that drops samples (GKT: the
  teacher's probability of a forgotten class at least ``tau``; BlockF: the teacher's argmax is
  forgotten), or the *PostFilter* (PF: every sample kept, the forgotten classes' logits set to
  the smallest logit and what they lost spread over the retained classes).

ISPF is inhibited + PostFilter; ``ispf-is`` inhibited + GKT's gate; ``ispf-pf`` plain + PostFilter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Variant:
    """One data-free method: the generator's adversarial term and the student's target."""

    inhibited: bool  # IS generator loss instead of the plain adversarial one
    target: str  # "post-filter", "gkt" (drop p_t(f) >= tau) or "blockf" (drop argmax in F)


VARIANTS = {
    "ispf": Variant(inhibited=True, target="post-filter"),
    "ispf-is": Variant(inhibited=True, target="gkt"),
    "ispf-pf": Variant(inhibited=False, target="post-filter"),
    "gkt": Variant(inhibited=False, target="gkt"),
    "blockf": Variant(inhibited=False, target="blockf"),
}


@dataclass(frozen=True)
class DataFreeSettings:  # pylint: disable=too-many-instance-attributes
    """The generator and distillation schedule: ``epochs`` x ``cycles`` x (generator steps, student steps);
    the defaults are the ISPF paper's (the app passes its ``ispf-*`` settings)."""

    epochs: int = 200
    cycles: int = 5
    generator_steps: int = 1
    student_steps: int = 10
    batch_size: int = 256
    latent_dim: int = 256
    generator_width: int = 64
    generator_lr: float = 1e-3
    student_lr: float = 0.05
    tau: float = 0.01
    temperature: float = 1.0
    use_bn_statistics: bool = True  # only has an effect on a teacher with BatchNorm layers


class Generator(nn.Module):
    """z -> Linear -> (4w, s/4, s/4) -> BN -> up -> Conv 2w -> BN -> LReLU -> up -> Conv w -> BN -> LReLU
    -> Conv C -> sigmoid, then the dataset's normalisation (images as the models see them)."""

    def __init__(self, latent_dim: int, width: int, channels: int, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.start = image_size // 4
        self.project = nn.Linear(latent_dim, 4 * width * self.start * self.start)
        self.body = nn.Sequential(
            nn.BatchNorm2d(4 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(4 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid(),
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        """Normalised images for latent codes ``(B, latent_dim)``."""
        features = self.project(latent).view(len(latent), -1, self.start, self.start)
        return (self.body(features) - self.mean) / self.std


def post_filter(teacher_logits: torch.Tensor, forget: torch.Tensor, tau: float) -> torch.Tensor:
    """PostFilter: for each sample, every forgotten class whose softmax exceeds ``tau`` has its
    logit lowered to the sample's smallest logit; the total lowered is added, split evenly, to
    the retained classes' logits. ``forget`` is a boolean mask over classes."""
    smallest = teacher_logits.min(dim=1, keepdim=True).values
    probabilities = torch.softmax(teacher_logits, dim=1)
    lowered = forget.unsqueeze(0) & (probabilities > tau)
    excess = ((teacher_logits - smallest) * lowered).sum(dim=1, keepdim=True)
    retained = (~forget).unsqueeze(0).to(teacher_logits.dtype)
    filtered = teacher_logits + retained * excess / int((~forget).sum())
    return torch.where(lowered, smallest.expand_as(teacher_logits), filtered)


def kept_samples(teacher_logits: torch.Tensor, forget: torch.Tensor, target: str, tau: float) -> torch.Tensor:
    """Which samples of a batch the student learns from: all (PostFilter), those GKT's gate lets
    through (every forgotten class below ``tau``), or those BlockF keeps (argmax retained)."""
    if target == "post-filter":
        return torch.ones(len(teacher_logits), dtype=torch.bool, device=teacher_logits.device)
    if target == "gkt":
        return (torch.softmax(teacher_logits, dim=1)[:, forget] < tau).all(dim=1)
    if target == "blockf":
        return ~forget[teacher_logits.argmax(dim=1)]
    raise ValueError(f"unknown student target {target!r}")


def adversarial_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, forget: torch.Tensor,
                     inhibited: bool) -> torch.Tensor:
    """The generator's adversarial term, from k_ic = p_t,ic (log p_t,ic - log p_s,ic): plain
    ``-mean_i sum_c k_ic``; inhibited ``mean_i (sum_{c in F} k_ic - sum_{c not in F} k_ic)``."""
    log_teacher = F.log_softmax(teacher_logits, dim=1)
    terms = log_teacher.exp() * (log_teacher - F.log_softmax(student_logits, dim=1))
    if not inhibited:
        return -terms.sum(dim=1).mean()
    return (terms[:, forget].sum(dim=1) - terms[:, ~forget].sum(dim=1)).mean()


def balance_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``sum_c pbar_c log pbar_c`` of the batch-mean teacher softmax: low when classes are balanced."""
    mean_probability = torch.softmax(teacher_logits, dim=1).mean(dim=0)
    return (mean_probability * mean_probability.clamp_min(1e-12).log()).sum()


class BatchNormStatistics:
    """Collects, during a teacher forward pass, how far each BatchNorm layer's batch mean and
    variance are from its running statistics (the generator's L_BN)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.distances: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in teacher.modules()
                        if isinstance(layer, nn.BatchNorm2d)]

    def __bool__(self) -> bool:
        return bool(self.handles)

    def _hook(self, layer: nn.BatchNorm2d, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
        batch = inputs[0]
        mean, variance = batch.mean(dim=(0, 2, 3)), batch.var(dim=(0, 2, 3), unbiased=False)
        self.distances.append(torch.norm(mean - layer.running_mean, 2) + torch.norm(variance - layer.running_var, 2))

    def take(self) -> torch.Tensor:
        """The summed distance of the last forward pass (then cleared)."""
        total = torch.stack(self.distances).sum() if self.distances else torch.zeros(())
        self.distances = []
        return total

    def remove(self) -> None:
        """Detach the hooks from the teacher."""
        for handle in self.handles:
            handle.remove()


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over samples."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2


def unlearn_data_free(  # pylint: disable=too-many-locals
    teacher: nn.Module, student: nn.Module, generator: Generator, forget_classes: list[int], variant: Variant,
    settings: DataFreeSettings, seed: int, progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``generator`` and distil ``student`` from ``teacher`` without ``forget_classes``.

    The teacher is frozen in eval mode; the student and generator are trained in place on the
    teacher's device (the generator stays in training mode: its BatchNorm uses batch
    statistics). Returns the share of generated samples the student learned from
    (``kept-fraction``), the share the teacher classed as forgotten (``forget-fraction``, what
    IS lowers) and whether the BatchNorm term was used (the teacher has BatchNorm layers).
    """
    device = next(teacher.parameters()).device
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    num_classes = next(m for m in reversed(list(teacher.modules())) if isinstance(m, nn.Linear)).out_features
    forget = torch.zeros(num_classes, dtype=torch.bool, device=device)
    forget[torch.as_tensor(forget_classes, device=device)] = True
    random = torch.Generator(device=device).manual_seed(seed)
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=settings.generator_lr, betas=(0.5, 0.999))
    student_optimizer = torch.optim.SGD(student.parameters(), lr=settings.student_lr, momentum=0.9, weight_decay=1e-4)
    total_student_steps = settings.epochs * settings.cycles * settings.student_steps
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(student_optimizer, max(total_student_steps, 1))
    statistics = BatchNormStatistics(teacher) if settings.use_bn_statistics else None
    counts = {"generated": 0, "kept": 0, "forget": 0}

    def latent() -> torch.Tensor:
        return torch.randn(settings.batch_size, settings.latent_dim, generator=random, device=device)

    try:
        for epoch in range(settings.epochs):
            for _ in range(settings.cycles):
                student.eval()
                for _ in range(settings.generator_steps):
                    images = generator(latent())
                    teacher_logits = teacher(images)
                    loss = (F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1)) + balance_loss(teacher_logits)
                            + adversarial_loss(teacher_logits, student(images), forget, variant.inhibited))
                    if statistics:
                        loss = loss + statistics.take()
                    generator_optimizer.zero_grad()
                    loss.backward()
                    generator_optimizer.step()
                student.train()
                for _ in range(settings.student_steps):
                    with torch.no_grad():
                        images = generator(latent())
                        teacher_logits = teacher(images)
                        if statistics:
                            statistics.take()
                        keep = kept_samples(teacher_logits, forget, variant.target, settings.tau)
                        counts["forget"] += int(forget[teacher_logits.argmax(dim=1)].sum())
                        if variant.target == "post-filter":
                            teacher_logits = post_filter(teacher_logits, forget, settings.tau)
                    counts["generated"] += len(images)
                    counts["kept"] += int(keep.sum())
                    if keep.any():
                        loss = distillation_loss(teacher_logits[keep], student(images[keep]), settings.temperature)
                        student_optimizer.zero_grad()
                        loss.backward()
                        student_optimizer.step()
                        schedule.step()  # a batch with nothing kept is no step
            if progress is not None:
                progress(epoch + 1, {"kept-fraction": counts["kept"] / max(counts["generated"], 1)})
    finally:
        if statistics is not None:
            statistics.remove()
    student.eval()
    generated = max(counts["generated"], 1)
    return {"kept-fraction": counts["kept"] / generated, "forget-fraction": counts["forget"] / generated,
            "bn-statistics": float(bool(statistics)), "student-steps": float(total_student_steps)}
