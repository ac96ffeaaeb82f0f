"""Gradient matching (Zhao et al.'s DC distance): how far the gradient that a class's synthetic
images give a model is from the gradient of that class's real images.

:func:`matching_distance` sums it over the classes of a step. Without batch norm the classes
are matched in one batched computation (``torch.func``: one vmapped per-class gradient instead
of a Python loop of small forward and double-backward passes); with batch norm, whose running
statistics every forward updates in place, class by class. Both give the same value and the
same gradient for the images. Plain torch; no Flower.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

MATCH_EPSILON = 1e-6


def layer_distance(synthetic: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """DC distance between two gradients of one parameter tensor.

    Rows are output units (a conv weight ``(out, in, h, w)`` becomes ``(out, in*h*w)``,
    a linear weight stays ``(out, in)``); the distance is the sum over rows of
    ``1 - cos(row_s, row_r)``. 1-D tensors (biases, norm parameters) contribute 0.
    """
    if synthetic.dim() == 1:
        return synthetic.new_zeros(())
    a = synthetic.reshape(synthetic.shape[0], -1)
    b = real.reshape(real.shape[0], -1)
    return _row_distance(a, b)


def _row_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cosine = (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + MATCH_EPSILON)
    return (1.0 - cosine).sum()


def gradient_distance(synthetic: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of :func:`layer_distance` over the parameter tensors of a model."""
    return torch.stack([layer_distance(s, r) for s, r in zip(synthetic, real, strict=True)]).sum()


def class_distance(
    model: nn.Module,
    params: list[torch.Tensor],
    synthetic_images: torch.Tensor,
    cls: int,
    real_grads: Sequence[torch.Tensor],
) -> torch.Tensor:
    """DC distance of one class: the gradient of the mean loss of ``synthetic_images`` (all
    labelled ``cls``) with respect to ``params``, against ``real_grads``; differentiable in the images."""
    targets = torch.full((len(synthetic_images),), cls, dtype=torch.long, device=synthetic_images.device)
    loss = nn.functional.cross_entropy(model(synthetic_images), targets)
    synthetic_grads = torch.autograd.grad(loss, params, create_graph=True)
    return gradient_distance(synthetic_grads, [g.detach() for g in real_grads])


def has_batch_norm(model: nn.Module) -> bool:
    """Whether a forward pass updates running statistics (batch norm in training mode)."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def matching_distance(
    model: nn.Module,
    classes: Sequence[int],
    synthetic_images: Sequence[torch.Tensor],
    real_grads: Sequence[Sequence[torch.Tensor]],
    batched: bool = True,
) -> torch.Tensor:
    """Sum over ``classes`` of :func:`class_distance`: class ``classes[k]``'s images
    ``synthetic_images[k]`` against its real gradient ``real_grads[k]`` (one tensor per trainable
    parameter, in ``model.parameters()`` order). ``batched`` computes it with
    :func:`batched_distance`, unless the model has batch norm or padding the classes to one
    size would more than double the images; else class by class."""
    padded = len(synthetic_images) * max(len(images) for images in synthetic_images)
    if not batched or has_batch_norm(model) or padded > 2 * sum(len(images) for images in synthetic_images):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.stack([class_distance(model, params, images, cls, grads)
                            for cls, images, grads in zip(classes, synthetic_images, real_grads, strict=True)]).sum()
    return batched_distance(model, classes, synthetic_images, real_grads)


def batched_distance(
    model: nn.Module,
    classes: Sequence[int],
    synthetic_images: Sequence[torch.Tensor],
    real_grads: Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """:func:`matching_distance` for every class at once (models without batch norm).

    The classes' images are stacked to ``(classes, n, ...)``, classes with fewer than ``n``
    images padded with weight-0 copies, and ``vmap(grad(loss))`` gives every class's synthetic
    gradient of the weights it is matched on (parameters of 2+ dimensions; 1-D ones add 0).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    matched = [index for index, (_, p) in enumerate(named) if p.dim() > 1]
    weights = {named[index][0]: named[index][1].detach() for index in matched}
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in weights}
    fixed.update(dict(model.named_buffers()))
    size = max(len(images) for images in synthetic_images)
    padding = [torch.arange(size, device=images.device) % len(images) for images in synthetic_images]
    images = torch.stack([class_images[order] for class_images, order in zip(synthetic_images, padding)])
    mask = torch.stack([(torch.arange(size, device=images.device) < len(class_images)).to(images.dtype)
                        for class_images in synthetic_images])
    labels = torch.tensor(list(classes), device=images.device).unsqueeze(1).expand(-1, size)

    def class_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        losses = nn.functional.cross_entropy(functional_call(model, {**fixed, **params}, (x,)), y, reduction="none")
        return (losses * w).sum() / w.sum()

    synthetic = vmap(grad(class_loss), in_dims=(None, 0, 0, 0))(weights, images, labels, mask)
    total = images.new_zeros(())
    for index in matched:
        name = named[index][0]
        real = torch.stack([grads[index].detach() for grads in real_grads])
        rows = len(classes), real.shape[1]
        total = total + _row_distance(synthetic[name].reshape(*rows, -1), real.reshape(*rows, -1))
    return total
