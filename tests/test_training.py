"""Local SGD and accuracy helpers (plain torch)."""

from __future__ import annotations

import math

import torch

from qd_app.config import RunConfig
from qd_app.core.data import LabeledImages, load_split
from qd_app.core.models import ModelSpec, build_model
from qd_app.core.training import (
    batch_indices,
    make_optimizer,
    per_class_accuracy,
    predict,
    seeded_generator,
    train_epochs,
)


def test_batch_indices_cover_each_epoch_and_respect_the_step_cap():
    batches = list(batch_indices(10, 4, epochs=2, max_steps=0, generator=seeded_generator(0)))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert len(list(batch_indices(10, 4, epochs=5, max_steps=4, generator=seeded_generator(0)))) == 4


def test_training_learns_the_tiny_dataset(tiny_mnist_dir):
    config = RunConfig(data_dir=str(tiny_mnist_dir), model_width=16)
    train, test = load_split("mnist", tiny_mnist_dir, True), load_split("mnist", tiny_mnist_dir, False)
    model = build_model(ModelSpec.from_config(config), seed=0)
    before = (predict(model, test.images, 64) == test.labels).float().mean()
    stats = train_epochs(model, train, optimizer=make_optimizer(model, 0.05, 0.9), epochs=3, batch_size=32,
                         generator=seeded_generator(0))
    after = (predict(model, test.images, 64) == test.labels).float().mean()
    assert stats.steps == 3 * math.ceil(600 / 32) and stats.sample_gradients == 1800
    assert after > 0.9 > before


def test_empty_data_trains_nothing():
    model = build_model(ModelSpec.from_config(RunConfig()))
    empty = LabeledImages(torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long))
    stats = train_epochs(model, empty, optimizer=make_optimizer(model, 0.1), epochs=1, batch_size=8,
                         generator=seeded_generator(0))
    assert stats.steps == 0 and stats.mean_loss == 0.0


def test_per_class_accuracy_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 0])
    accuracy = per_class_accuracy(predictions, labels, 4)
    assert accuracy[:3] == [0.5, 2 / 3, 0.0] and math.isnan(accuracy[3])
