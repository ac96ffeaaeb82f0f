"""FU-MP's math (Wang et al. 2022): which units a layer has, their per-class activations,
TF-IDF scores for the classes to forget, and pruning (plain torch).

Clients compute :func:`activation_statistics` on their data; the server averages them,
scores the units with :func:`tf_idf_scores` and zeroes the best-scoring ones with :func:`prune`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .data import LabeledImages
from .models import StateDict


@dataclass(frozen=True)
class PrunableLayer:
    """A layer of units that FU-MP scores and prunes.

    ``module`` names where the units' activations are read: for conv channels the ReLU
    after the conv (one unit per channel, its spatial mean); for features the
    classifier (one unit per input feature, read from its input). ``parameters`` are
    the ``(parameter name, dimension)`` slices that carry the units and are zeroed with
    them.
    """

    module: str
    per_channel: bool
    parameters: tuple[tuple[str, int], ...]

    def activations(self, module_input: torch.Tensor, module_output: torch.Tensor) -> torch.Tensor:
        """``(batch, units)`` activations of this layer's units."""
        return module_output.mean(dim=(2, 3)) if self.per_channel else module_input.flatten(1)

    def width(self, model: nn.Module) -> int:
        """Number of units."""
        name, dim = self.parameters[0]
        return model.get_parameter(name).shape[dim]


def prunable_layers(model: nn.Module, target: str) -> list[PrunableLayer]:
    """The units FU-MP works on (``prune-target``).

    ``channels`` (the FU-MP paper's): every conv layer's output channels, with the norm's
    affine parameters that follow. ``features``: the inputs of the last linear layer (the
    last block's pooled feature map, channel x position); on an instance-norm ConvNet
    each channel's spatial mean is pinned by the norm, so channel means barely tell
    classes apart, while these units do.
    """
    modules = list(model.named_modules())
    if target == "features":
        name = [name for name, module in modules if isinstance(module, nn.Linear)][-1]
        return [PrunableLayer(name, False, ((f"{name}.weight", 1),))]
    layers = []
    for index, (name, module) in enumerate(modules):
        if not isinstance(module, nn.Conv2d):
            continue
        parameters = [(f"{name}.weight", 0), (f"{name}.bias", 0)]
        for follower_name, follower in modules[index + 1:]:
            if isinstance(follower, (nn.GroupNorm, nn.BatchNorm2d)) and follower.affine:
                parameters += [(f"{follower_name}.weight", 0), (f"{follower_name}.bias", 0)]
            if isinstance(follower, nn.ReLU):
                layers.append(PrunableLayer(follower_name, True, tuple(parameters)))
                break
    return layers


@torch.no_grad()
def activation_statistics(model: nn.Module, layers: list[PrunableLayer], data: LabeledImages, num_classes: int,
                          batch_size: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer, the per-class sum over samples of every unit's (post-ReLU) activation
    (``(K, units)``), and the per-class sample counts."""
    model.eval()
    modules = dict(model.named_modules())
    captured: list[torch.Tensor] = []
    hooks = [modules[layer.module].register_forward_hook(
        lambda _m, inputs, output, layer=layer: captured.append(layer.activations(inputs[0], output)))
        for layer in layers]
    sums: list[torch.Tensor | None] = [None] * len(layers)
    try:
        for start in range(0, len(data), batch_size):
            labels = data.labels[start:start + batch_size].to(device)
            captured.clear()
            model(data.images[start:start + batch_size].to(device))
            one_hot = nn.functional.one_hot(labels, num_classes).double()
            for index, activations in enumerate(captured):
                batch_sum = one_hot.T @ activations.double()
                sums[index] = batch_sum if sums[index] is None else sums[index] + batch_sum
    finally:
        for hook in hooks:
            hook.remove()
    sums = [s.cpu() if s is not None else torch.zeros(num_classes, layer.width(model), dtype=torch.float64)
            for s, layer in zip(sums, layers)]
    return sums, torch.bincount(data.labels, minlength=num_classes).double()


def tf_idf_scores(class_means: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """FU-MP's unit scores for the target classes, summed over them (``class_means``: ``(K, units)``).

    TF_j = A_t,j / sum_j A_t,j;  IDF_j = log(K / (1 + #{c : A_c,j >= mean_c A_c,j})).
    """
    num_classes = class_means.shape[0]
    above_mean = (class_means >= class_means.mean(dim=0, keepdim=True)).sum(dim=0)
    idf = torch.log(num_classes / (1.0 + above_mean.double()))
    scores = torch.zeros(class_means.shape[1], dtype=torch.float64)
    for target in targets:
        activation = class_means[target].double()
        scores += activation / activation.sum().clamp_min(1e-12) * idf
    return scores


def prune(state: StateDict, layers: list[PrunableLayer], units: list[list[int]]) -> StateDict:
    """Zero the parameter slices of the given units of every layer."""
    pruned = {key: value.clone() for key, value in state.items()}
    for layer, indices in zip(layers, units):
        for name, dim in layer.parameters:
            pruned[name].index_fill_(dim, torch.tensor(indices, dtype=torch.long), 0)
    return pruned
