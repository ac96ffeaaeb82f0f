"""Gradient ascent and the forget / retain data of a store (plain torch)."""

from __future__ import annotations

import math

import pytest
import torch

from qd_app.config import RunConfig
from qd_app.core.data import LabeledImages, load_split
from qd_app.core.distillation import SyntheticSet
from qd_app.core.models import ModelSpec, build_model
from qd_app.core.training import logits, make_optimizer, predict, seeded_generator, train_epochs
from qd_app.core.unlearning import (
    FORGET_PROBABILITY, LOSS_CAP, capped_losses, class_loss_quantiles, fits_like_unseen, forget_data, forgotten,
    gradient_ascent, relearn_data, retain_data,
)


def trained_model(tiny_mnist_dir):
    data = load_split("mnist", tiny_mnist_dir, True)
    model = build_model(ModelSpec.from_config(RunConfig(model_width=8)), seed=0)
    train_epochs(model, data, optimizer=make_optimizer(model, 0.02, 0.9), epochs=1, batch_size=32,
                 generator=seeded_generator(0))  # learnt, not yet saturated: ascent has a gradient to follow
    return model, data


def class_data(data: LabeledImages, cls: int) -> LabeledImages:
    return data.subset(torch.nonzero(data.labels == cls).flatten())


def test_ascent_raises_the_loss_and_stops_once_the_data_is_forgotten(tiny_mnist_dir):
    model, data = trained_model(tiny_mnist_dir)
    forget = class_data(data, 3)
    loss_before = torch.nn.functional.cross_entropy(model(forget.images), forget.labels).item()
    assert (predict(model, forget.images, 64) == 3).float().mean() > 0.9
    stats = gradient_ascent(model, forget, optimizer=make_optimizer(model, 0.05, 0.9), epochs=200,
                            batch_size=64, generator=seeded_generator(1))
    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(forget.images), dim=1)[:, 3]
        loss_after = torch.nn.functional.cross_entropy(model(forget.images), forget.labels).item()
    assert loss_after > loss_before
    assert probabilities.mean() < FORGET_PROBABILITY
    assert stats.steps < 200  # stopped early, well before the cap
    assert (predict(model, forget.images, 64) == 3).float().mean() == 0.0


def test_client_level_ascent_runs_its_fixed_epochs(tiny_mnist_dir):
    model, data = trained_model(tiny_mnist_dir)
    stats = gradient_ascent(model, data.subset(torch.arange(100)), optimizer=make_optimizer(model, 0.001),
                            epochs=3, batch_size=50, generator=seeded_generator(1), goal=None)
    assert stats.steps == 6


def test_class_loss_quantiles_are_taken_of_capped_losses_per_class():
    outputs = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 100.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    by_hand = [math.log(2), math.log(1 + math.exp(-2)), LOSS_CAP]  # the third (loss 100) counts as LOSS_CAP
    assert capped_losses(outputs, labels).tolist() == pytest.approx(by_hand + [math.log(2)])
    quantiles = torch.tensor(class_loss_quantiles(outputs, labels, 3, count=3)).view(3, 3)
    assert quantiles[0].tolist() == pytest.approx(sorted(by_hand))  # min, median, max of class 0
    assert quantiles[1].tolist() == pytest.approx([math.log(2)] * 3)
    assert quantiles[2].isnan().all()  # no sample of class 2


def test_data_drawn_like_the_unseen_data_fits_like_unseen_and_better_fitted_data_does_not():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (4000,), generator=generator)
    confidence = torch.rand(4000, generator=generator) * 6  # true-class logit margin, spread
    outputs = torch.zeros(4000, 2)
    outputs[torch.arange(4000), labels] = confidence
    unseen = class_loss_quantiles(outputs[:2000], labels[:2000], 2)
    goal = fits_like_unseen(unseen, 2)

    class Fixed(torch.nn.Module):  # a "model" whose outputs are given: row i for input i
        def __init__(self, rows):
            super().__init__()
            self.rows = rows

        def forward(self, index):
            return self.rows[index.flatten().long()]

    def fits(rows, data_labels):
        return goal(Fixed(rows), LabeledImages(torch.arange(len(rows)).float().view(-1, 1), data_labels), "cpu")

    assert fits(outputs[2000:] * 0.98, labels[2000:])  # a little less confident than unseen data: fits like it
    assert not fits(outputs[2000:] * 1.1, labels[2000:])  # more confident: fits better than unseen data


def test_client_level_ascent_on_synthetic_data_stops_once_real_data_fits_like_unseen(tiny_mnist_dir):
    model, data = trained_model(tiny_mnist_dir)
    train_epochs(model, data, optimizer=make_optimizer(model, 0.02, 0.9), epochs=3, batch_size=32,
                 generator=seeded_generator(3))  # fit the training data better than unseen data
    unseen = load_split("mnist", tiny_mnist_dir, False)
    goal = fits_like_unseen(class_loss_quantiles(logits(model, unseen.images, 64), unseen.labels, 10), 10)
    client = data.subset(torch.arange(0, len(data), 2))
    stand_ins = data.subset(torch.arange(1, len(data), 2))  # the ascent runs on other images of the classes
    assert not goal(model, client, torch.device("cpu"))
    stats = gradient_ascent(model, stand_ins, optimizer=make_optimizer(model, 0.02, 0.9), epochs=20, batch_size=32,
                            generator=seeded_generator(1), goal=goal, goal_data=client)
    assert 0 < stats.steps < 20 * math.ceil(len(stand_ins) / 32)
    assert goal(model, client, torch.device("cpu"))
    assert (predict(model, client.images, 64) == client.labels).float().mean() > 0.5  # fits, not forgotten


def test_forget_and_retain_data_select_by_class():
    synthetic = LabeledImages(torch.arange(4.0).view(4, 1, 1, 1), torch.tensor([0, 1, 2, 2]))
    augmentation = LabeledImages(torch.arange(10.0, 14.0).view(4, 1, 1, 1), torch.tensor([0, 1, 2, 2]))
    store = SyntheticSet(synthetic, augmentation)
    assert forget_data(store, [2]).images.flatten().tolist() == [2.0, 3.0]
    assert forget_data(store, None).labels.tolist() == [0, 1, 2, 2]
    retained = retain_data(store, [2])
    assert retained.images.flatten().tolist() == [0.0, 1.0, 10.0, 11.0]
    assert retained.labels.tolist() == [0, 1, 0, 1]


def test_each_relearned_class_is_repeated_to_weigh_half_as_much_as_the_other_data():
    synthetic = LabeledImages(torch.zeros(4, 1, 1, 1), torch.tensor([0, 1, 2, 2]))
    store = SyntheticSet(synthetic, LabeledImages(torch.ones(4, 1, 1, 1), torch.tensor([0, 1, 2, 2])))
    data = relearn_data(store, [1], excluded_classes=[])
    assert torch.bincount(data.labels).tolist() == [2, 4, 4]  # class 1 twice (6 others / (2 x 2) rounds to 2): 4 of 10
    # two classes held (4 samples) against 4 others: 2 x 4 / (2 x 4) = 1 repeat; the
    # same request at a client holding only one of them is a one-class relearning
    assert torch.bincount(relearn_data(store, [0, 1], excluded_classes=[]).labels).tolist() == [2, 2, 4]
    assert torch.bincount(relearn_data(store, [1, 7], excluded_classes=[]).labels).tolist() == [2, 4, 4]
    wide = SyntheticSet(LabeledImages(torch.zeros(12, 1, 1, 1), torch.tensor([0, 1] + [2] * 10)),
                        LabeledImages(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long)))
    # 10 others: one class alone would be repeated 5 times; two held: 2 x 10 / (2 x 2) = 5 each
    assert torch.bincount(relearn_data(wide, [0, 1], excluded_classes=[]).labels).tolist() == [5, 5, 10]
    assert torch.bincount(relearn_data(store, [], excluded_classes=[2]).labels).tolist() == [2, 2]
    assert torch.bincount(relearn_data(store, [1], excluded_classes=[0, 2]).labels).tolist() == [0, 2]


def test_forgotten_samples_stop_pulling_the_ascent(tiny_mnist_dir):
    """A sample past the loss cap gives no gradient: ascent on it alone leaves the model as it is."""
    model, data = trained_model(tiny_mnist_dir)
    forget = class_data(data, 3).subset(torch.arange(4))
    wrong = LabeledImages(forget.images, (forget.labels + 1) % 10)
    gradient_ascent(model, wrong, optimizer=make_optimizer(model, 0.05, 0.9), epochs=30, batch_size=4,
                    generator=seeded_generator(1), goal=None)  # push the "wrong" label far out
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        assert (torch.softmax(model(wrong.images), 1)[torch.arange(4), wrong.labels] < FORGET_PROBABILITY).all()
    gradient_ascent(model, wrong, optimizer=make_optimizer(model, 0.05), epochs=5, batch_size=4,
                    generator=seeded_generator(2), goal=None)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_ascent_takes_no_step_on_data_already_forgotten(tiny_mnist_dir):
    model, data = trained_model(tiny_mnist_dir)
    forget = class_data(data, 3)
    gradient_ascent(model, forget, optimizer=make_optimizer(model, 0.05, 0.9), epochs=200, batch_size=64,
                    generator=seeded_generator(1))
    assert forgotten(model, forget)
    again = gradient_ascent(model, forget, optimizer=make_optimizer(model, 0.05, 0.9), epochs=200, batch_size=64,
                            generator=seeded_generator(2))
    assert again.steps == 0
