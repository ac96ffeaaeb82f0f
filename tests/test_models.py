"""The ConvNet and the model factory."""

from __future__ import annotations

import pytest
import torch

from qd_app.config import RunConfig
from qd_app.core.data import DATASETS
from qd_app.core.models import ConvNet, ModelSpec, build_model


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_convnet_gives_one_logit_per_class_for_every_dataset(dataset):
    spec = DATASETS[dataset]
    model = build_model(ModelSpec.from_config(RunConfig(dataset=dataset)))
    logits = model(torch.randn(5, spec.channels, spec.image_size, spec.image_size))
    assert logits.shape == (5, spec.num_classes)


def test_paper_default_convnet_has_the_reference_size():
    config = RunConfig(dataset="cifar10", model_width=128, model_depth=3)
    model = build_model(ModelSpec.from_config(config))
    assert sum(p.numel() for p in model.parameters()) == 320_010
    assert isinstance(model.features[1], torch.nn.GroupNorm) and model.features[1].num_groups == 128
    mnist = build_model(ModelSpec.from_config(config.replace(dataset="mnist")))
    assert mnist.classifier.in_features == 128 * 4 * 4  # 28x28 padded to 32x32


@pytest.mark.parametrize(("norm", "pooling"), [("batch", "max"), ("none", "none"), ("instance", "avg")])
def test_norm_and_pooling_variants(norm, pooling):
    spec = ModelSpec("convnet", 3, 32, 10, 2, 8, norm, pooling)
    assert ConvNet(spec)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_seeded_initialisation_is_reproducible():
    spec = ModelSpec.from_config(RunConfig())
    first, second = build_model(spec, seed=1), build_model(spec, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    third = build_model(spec, seed=2)
    assert not torch.equal(first.classifier.weight, third.classifier.weight)
