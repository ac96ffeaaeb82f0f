"""Gradient matching (DC distance, in-situ distillation, fine-tuning), without Flower."""

from __future__ import annotations

import math

import pytest
import torch

from qd_app.config import RunConfig
from qd_app.core.data import LabeledImages, load_split
from qd_app.core import matching
from qd_app.core.distillation import (
    finetune_synthetic,
    initial_synthetic_set,
    nearest_real_distances,
    synthetic_count,
    train_with_distillation,
)
from qd_app.core.matching import batched_distance, class_distance, gradient_distance, layer_distance, matching_distance
from qd_app.core.models import ModelSpec, build_model
from qd_app.core.training import make_optimizer, seeded_generator


def test_layer_distance_by_hand():
    real = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    synthetic = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    # row 0: same direction -> 1 - 2/(2+1e-6); row 1: orthogonal -> 1 - 0
    expected = (1 - 2 / (2 + 1e-6)) + 1.0
    assert layer_distance(synthetic, real).item() == pytest.approx(expected, abs=1e-7)
    opposite = layer_distance(-real, real).item()
    assert opposite == pytest.approx(2 * (1 + 1 / (1 + 1e-6)), abs=1e-6)


def test_conv_weights_compare_per_output_channel_and_1d_tensors_count_zero():
    real = torch.zeros(2, 1, 2, 2)
    real[0, 0, 0, 0] = 1.0
    real[1, 0, 1, 1] = 1.0
    synthetic = real.clone()
    synthetic[1] = 0.0
    synthetic[1, 0, 0, 0] = 5.0  # channel 1 now points elsewhere: orthogonal
    assert layer_distance(synthetic, real).item() == pytest.approx(1.0 + (1 - 1 / (1 + 1e-6)), abs=1e-6)
    assert layer_distance(torch.randn(7), torch.randn(7)).item() == 0.0
    total = gradient_distance([synthetic, torch.randn(3)], [real, torch.randn(3)])
    assert total.item() == pytest.approx(layer_distance(synthetic, real).item())


def test_synthetic_set_has_ceil_size_per_class_and_disjoint_augmentation(tiny_mnist_dir):
    data = load_split("mnist", tiny_mnist_dir, True)
    uneven = data.subset(torch.cat([torch.nonzero(data.labels == 0).flatten()[:45],
                                    torch.nonzero(data.labels == 1).flatten()[:3]]))
    store = initial_synthetic_set(uneven, scale=10, generator=seeded_generator(0))
    assert store.class_counts(10)[:2] == [5, 1] == [synthetic_count(45, 10), synthetic_count(3, 10)]
    assert store.augmentation.class_counts(10)[:2] == [5, 1]
    synthetic_rows = {tuple(x.flatten()[:40].tolist()) for x in store.synthetic.images[store.synthetic.labels == 0]}
    augmentation_rows = {tuple(x.flatten()[:40].tolist()) for x in store.augmentation.images[store.augmentation.labels == 0]}
    assert not synthetic_rows & augmentation_rows


def test_matching_reduces_the_distance_to_the_real_gradient(tiny_mnist_dir):
    data = load_split("mnist", tiny_mnist_dir, True)
    model = build_model(ModelSpec.from_config(RunConfig(model_width=8)), seed=0)
    params = list(model.parameters())
    real = data.subset(torch.nonzero(data.labels == 2).flatten())
    real_loss = torch.nn.functional.cross_entropy(model(real.images), real.labels)
    real_grads = torch.autograd.grad(real_loss, params)
    images = torch.randn(4, 1, 28, 28, requires_grad=True)
    optimizer = torch.optim.SGD([images], lr=0.1, momentum=0.5)
    distances = []
    for _ in range(30):
        distance = class_distance(model, params, images, 2, real_grads)
        distances.append(distance.item())
        optimizer.zero_grad()
        images.grad = torch.autograd.grad(distance, images)[0]
        optimizer.step()
    assert distances[-1] < 0.8 * distances[0]


def _class_batches(model, sizes):
    """Synthetic images (leaves) of classes 0.. with the given sizes, and a real gradient per class."""
    generator = torch.Generator().manual_seed(3)
    params = [p for p in model.parameters() if p.requires_grad]
    images = [torch.randn(size, 1, 28, 28, generator=generator).requires_grad_(True) for size in sizes]
    real = []
    for cls in range(len(sizes)):
        real_images = torch.randn(6, 1, 28, 28, generator=generator)
        loss = torch.nn.functional.cross_entropy(model(real_images), torch.full((6,), cls))
        real.append(torch.autograd.grad(loss, params))
    return params, images, real


@pytest.mark.parametrize("architecture", [{"model_norm": "instance"}, {"model_norm": "none", "model_pooling": "max"},
                                          "mlp"])
def test_batched_matching_gives_the_per_class_distance_and_image_gradients(architecture):
    spec = (ModelSpec.from_architecture(architecture, RunConfig()) if isinstance(architecture, str)
            else ModelSpec.from_config(RunConfig(model_width=8, **architecture)))
    model = build_model(spec, seed=0)
    params, images, real = _class_batches(model, [4, 1, 3])
    looped = torch.stack([class_distance(model, params, x, cls, g) for cls, (x, g) in enumerate(zip(images, real))]).sum()
    batched = batched_distance(model, [0, 1, 2], images, real)
    assert batched.item() == pytest.approx(looped.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(looped, images), torch.autograd.grad(batched, images)):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # float rounding only


def test_batch_norm_and_uneven_classes_are_matched_class_by_class(monkeypatch):
    calls = []
    monkeypatch.setattr(matching, "batched_distance", lambda *args: calls.append(args) or torch.zeros(()))
    batch_norm = build_model(ModelSpec.from_config(RunConfig(model_width=8, model_norm="batch")), seed=0)
    params, images, real = _class_batches(batch_norm, [4, 4])
    looped = sum(class_distance(batch_norm, params, x, cls, g).item() for cls, (x, g) in enumerate(zip(images, real)))
    running_mean = batch_norm.features[1].running_mean.clone()
    assert matching_distance(batch_norm, [0, 1], images, real).item() == pytest.approx(looped, rel=1e-4)
    assert not torch.equal(running_mean, batch_norm.features[1].running_mean)  # as the per-class loop does
    instance = build_model(ModelSpec.from_config(RunConfig(model_width=8)), seed=0)
    params, images, real = _class_batches(instance, [9, 1, 1])  # padding 27 slots for 11 images
    matching_distance(instance, [0, 1, 2], images, real)
    assert not calls
    params, images, real = _class_batches(instance, [4, 3, 4])
    matching_distance(instance, [0, 1, 2], images, real)
    assert len(calls) == 1


def test_training_with_batched_matching_equals_training_class_by_class(tiny_mnist_dir):
    data = load_split("mnist", tiny_mnist_dir, True).subset(torch.arange(300))
    spec = ModelSpec.from_config(RunConfig(model_width=8))
    results = []
    for batched in (True, False):
        store = initial_synthetic_set(data, scale=10, generator=seeded_generator(0))
        model = build_model(spec, seed=0)
        stats = train_with_distillation(
            model, data, store, optimizer=make_optimizer(model, 0.05, momentum=0.9), image_lr=0.1,
            image_momentum=0.5, image_batch=4, epochs=1, batch_size=50, generator=seeded_generator(1), batched=batched)
        results.append((model.state_dict(), store.synthetic.images, stats))
    (model_a, images_a, stats_a), (model_b, images_b, stats_b) = results
    assert torch.allclose(images_a, images_b, atol=1e-5)
    assert not torch.equal(images_a, initial_synthetic_set(data, 10, seeded_generator(0)).synthetic.images)
    for a, b in zip(model_a.values(), model_b.values()):
        assert torch.allclose(a, b, atol=1e-5)
    assert stats_a.sample_gradients == stats_b.sample_gradients
    assert stats_a.mean_distance == pytest.approx(stats_b.mean_distance, rel=1e-5)


def test_training_with_distillation_updates_the_model_as_sgd_would_and_changes_the_images(tiny_mnist_dir):
    data = load_split("mnist", tiny_mnist_dir, True).subset(torch.arange(200))
    spec = ModelSpec.from_config(RunConfig(model_width=8))
    store = initial_synthetic_set(data, scale=10, generator=seeded_generator(0))
    before = store.synthetic.images.clone()
    distilled, plain = build_model(spec, seed=0), build_model(spec, seed=0)
    stats = train_with_distillation(
        distilled, data, store, optimizer=make_optimizer(distilled, 0.05), image_lr=0.1, image_momentum=0.5,
        image_batch=4, epochs=1, batch_size=50, generator=seeded_generator(1),
    )
    from qd_app.core.training import train_epochs

    train_epochs(plain, data, optimizer=make_optimizer(plain, 0.05), epochs=1, batch_size=50,
                 generator=seeded_generator(1))
    for a, b in zip(distilled.state_dict().values(), plain.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)  # per-class gradients sum to the batch gradient
    assert stats.steps == 4 and stats.matching_steps > 0
    assert not torch.equal(before, store.synthetic.images)
    assert 200 + stats.matching_steps <= stats.sample_gradients <= 200 + 4 * stats.matching_steps


def test_finetuning_changes_the_images_and_counts_its_gradients(tiny_mnist_dir):
    data = load_split("mnist", tiny_mnist_dir, True)
    store = initial_synthetic_set(data, scale=30, generator=seeded_generator(0))
    before = store.synthetic.images.clone()
    count = finetune_synthetic(store, data, ModelSpec.from_config(RunConfig(model_width=8)), steps=2,
                               inner_steps=3, image_lr=0.1, image_momentum=0.5, batch_size=16,
                               generator=seeded_generator(2))
    assert count == 2 * 3 * (10 * 16 + 2 * len(store.synthetic))
    assert not torch.equal(before, store.synthetic.images)
    assert math.isfinite(float(store.synthetic.images.abs().max()))


def test_empty_data_gives_an_empty_store():
    empty = LabeledImages(torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long))
    store = initial_synthetic_set(empty, scale=100, generator=seeded_generator(0))
    assert len(store.synthetic) == 0 and store.classes() == []


def test_nearest_real_distance_is_zero_for_a_copy_and_the_rms_pixel_difference_otherwise():
    real = torch.randn(50, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    moved = real[7].clone()
    moved[0] += 0.5  # channel 0 (std 0.2) moved by 0.5 normalised units: 0.1 in pixels, on half the values
    distances = nearest_real_distances(torch.stack([real[3], moved]), real, std=(0.2, 0.4))
    assert distances[0].item() == 0.0
    assert distances[1].item() == pytest.approx(math.sqrt(16 * 0.1 ** 2 / 32))
    assert len(nearest_real_distances(real[:0], real, std=(0.2, 0.4))) == 0
