"""Model architectures and the factory that builds them from the run settings.

Two families: the ConvNet and an MLP (one of HDUS's heterogeneous client models);
``client-models`` and ``hdus-seed-model`` name presets of both (``ARCHITECTURES``). The backbone is the ConvNet of the QuickDrop and dataset-condensation papers:
``[Conv(W, 3x3) -> Norm -> ReLU -> Pool(2)] x D -> Linear``. Instance norm is
GroupNorm with one group per channel. For 28x28 single-channel images the first
convolution pads by 3 (28 -> 32), as the reference code does, so every dataset
reaches the classifier at the same feature size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ARCHITECTURES, RunConfig
from .data import DatasetSpec, dataset_spec

StateDict = dict[str, torch.Tensor]  # a model's parameters and buffers by name


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: checked when loading checkpoints and stores."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    depth: int
    width: int
    norm: str
    pooling: str

    @classmethod
    def from_config(cls, config: RunConfig, spec: DatasetSpec | None = None) -> ModelSpec:
        """The model the run settings ask for, shaped for the dataset."""
        spec = spec or dataset_spec(config.dataset)
        return cls(
            config.model, spec.channels, spec.image_size, spec.num_classes,
            config.model_depth, config.model_width, config.model_norm, config.model_pooling,
        )

    @classmethod
    def from_architecture(cls, name: str, config: RunConfig) -> ModelSpec:
        """A named preset of :data:`~qd_app.config.ARCHITECTURES` (ConvNets with the run's norm
        and pooling), shaped for the run's dataset."""
        family, width, depth = ARCHITECTURES[name]
        spec = dataset_spec(config.dataset)
        norm, pooling = (config.model_norm, config.model_pooling) if family == "convnet" else ("none", "none")
        return cls(family, spec.channels, spec.image_size, spec.num_classes, depth, width, norm, pooling)

    def as_dict(self) -> dict[str, str | int]:
        """Plain form for JSON metadata."""
        return dict(self.__dict__)


def _norm_layer(kind: str, width: int) -> nn.Module:
    if kind == "instance":
        return nn.GroupNorm(width, width, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(width)
    return nn.Identity()


def _pool_layer(kind: str) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(2)
    if kind == "max":
        return nn.MaxPool2d(2)
    return nn.Identity()


class ConvNet(nn.Module):
    """The paper's ConvNet: D blocks of conv, norm, ReLU, pooling, then a linear layer."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels, size = spec.channels, spec.image_size
        for block in range(spec.depth):
            padding = 3 if block == 0 and spec.image_size == 28 else 1
            blocks += [
                nn.Conv2d(in_channels, spec.width, kernel_size=3, padding=padding),
                _norm_layer(spec.norm, spec.width),
                nn.ReLU(inplace=True),
                _pool_layer(spec.pooling),
            ]
            in_channels = spec.width
            size = size + 2 * padding - 2
            if spec.pooling != "none":
                size //= 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(spec.width * size * size, spec.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        """Class logits."""
        return self.classifier(self.features(images).flatten(1))


class MLP(nn.Module):
    """A multilayer perceptron: D hidden layers of W units with ReLU, on the flattened image."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = spec.channels * spec.image_size * spec.image_size
        for _ in range(spec.depth):
            layers += [nn.Linear(features, spec.width), nn.ReLU(inplace=True)]
            features = spec.width
        layers.append(nn.Linear(features, spec.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        """Class logits."""
        return self.layers(images)


MODEL_BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {"convnet": ConvNet, "mlp": MLP}


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """A freshly initialised model; ``seed`` makes the initialisation reproducible."""
    if seed is None:
        return MODEL_BUILDERS[spec.name](spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_BUILDERS[spec.name](spec)
