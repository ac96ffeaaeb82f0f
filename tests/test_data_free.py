"""Data-free unlearning's math (ISPF, GKT, BlockF) in plain torch, and the Anamnesis Index."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qd_app.core.data_free import (
    VARIANTS, BatchNormStatistics, DataFreeSettings, Generator, adversarial_loss, balance_loss, kept_samples,
    post_filter, unlearn_data_free,
)
from qd_app.core.metrics import anamnesis_index, relearn_steps
from qd_app.core.models import ModelSpec, build_model

FORGET_3 = torch.tensor([False, False, False, True])


def test_post_filter_lowers_forgotten_logits_to_the_smallest_and_spreads_the_difference():
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0],    # class 3 likely: lowered to 0, 5 spread over 3 classes
                           [9.0, 1.0, 0.0, -20.0]])  # class 3 below tau: unchanged
    filtered = post_filter(logits, FORGET_3, tau=0.01)
    assert torch.allclose(filtered[0], torch.tensor([2 + 5 / 3, 1 + 5 / 3, 0 + 5 / 3, 0.0]))
    assert torch.equal(filtered[1], logits[1])
    assert filtered[0].argmax() == 0  # the retained classes keep their order


def test_the_student_targets_keep_every_sample_or_gate_them():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.6, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 5.0]])
    assert kept_samples(logits, FORGET_3, "post-filter", 0.01).tolist() == [True, True, True]
    assert kept_samples(logits, FORGET_3, "gkt", 0.01).tolist() == [True, False, False]  # p(3) >= tau dropped
    assert kept_samples(logits, FORGET_3, "blockf", 0.01).tolist() == [True, True, False]  # argmax 3 dropped
    with pytest.raises(ValueError, match="unknown student target"):
        kept_samples(logits, FORGET_3, "none", 0.01)


def test_inhibited_synthesis_rewards_disagreement_on_retained_classes_only():
    teacher = torch.tensor([[3.0, 0.0, 0.0, 3.0]])
    student = torch.zeros(1, 4)
    log_t = torch.log_softmax(teacher, 1)
    terms = log_t.exp() * (log_t - torch.log_softmax(student, 1))
    assert adversarial_loss(teacher, student, FORGET_3, inhibited=False).item() == pytest.approx(-terms.sum().item())
    expected = terms[0, 3] - terms[0, :3].sum()
    assert adversarial_loss(teacher, student, FORGET_3, inhibited=True).item() == pytest.approx(expected.item())


def test_balance_loss_is_lowest_for_balanced_predictions():
    balanced = torch.eye(4) * 10
    collapsed = torch.tensor([[10.0, 0, 0, 0]] * 4)
    assert balance_loss(balanced) < balance_loss(collapsed)


def test_batch_norm_statistics_measure_the_distance_to_the_running_statistics():
    layer = nn.BatchNorm2d(2)
    layer.running_mean.fill_(1.0)
    layer.running_var.fill_(4.0)
    model = nn.Sequential(layer).eval()
    statistics = BatchNormStatistics(model)
    assert statistics
    batch = 1.0 + 2.0 * torch.randn(4096, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    model(batch)
    assert statistics.take().item() < 0.2  # the batch matches the running statistics
    model(batch * 0.0)
    assert statistics.take().item() == pytest.approx(2 ** 0.5 + (2 * 16) ** 0.5, rel=1e-4)  # |0-1|, |0-4| per channel
    statistics.remove()
    model(batch)
    assert statistics.take().item() == 0.0
    assert not BatchNormStatistics(nn.Sequential(nn.GroupNorm(2, 2)))


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_the_generator_makes_normalised_images_of_the_dataset_shape(size, channels):
    generator = Generator(16, 4, channels, size, (0.5,) * channels, (0.25,) * channels)
    images = generator(torch.randn(5, 16))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -2.0 and images.max() <= 2.0  # (sigmoid - 0.5) / 0.25


def small_teacher(norm: str, bias_class: int | None = None) -> nn.Module:
    model = build_model(ModelSpec("convnet", 1, 28, 4, 1, 4, norm, "avg"), seed=0)
    if bias_class is not None:
        with torch.no_grad():
            model.classifier.bias[bias_class] = 50.0  # the teacher calls every image this class
    return model.eval()


SMALL = DataFreeSettings(epochs=2, cycles=1, student_steps=2, batch_size=8, latent_dim=8, generator_width=2)


def run(teacher: nn.Module, variant: str) -> tuple[nn.Module, nn.Module, Generator, dict]:
    student = build_model(ModelSpec("convnet", 1, 28, 4, 1, 4, "instance", "avg"), seed=1)
    before = copy.deepcopy(student)
    generator = Generator(8, 2, 1, 28, (0.5,), (0.25,))
    report = unlearn_data_free(teacher, student, generator, [3], VARIANTS[variant], SMALL, seed=0)
    return before, student, generator, report


def parameters_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_blockf_learns_nothing_from_a_teacher_that_calls_everything_forgotten_and_ispf_learns_from_all():
    teacher = small_teacher("instance", bias_class=3)
    before, student, _, report = run(teacher, "blockf")
    assert report["kept-fraction"] == 0.0 and report["forget-fraction"] == 1.0
    assert parameters_equal(before, student)
    before, student, _, report = run(teacher, "ispf")
    assert report["kept-fraction"] == 1.0 and not parameters_equal(before, student)
    assert report["bn-statistics"] == 0.0  # an instance-norm teacher has no BatchNorm statistics


def test_the_batch_norm_term_is_used_with_a_batch_norm_teacher_and_the_teacher_is_untouched():
    teacher = small_teacher("batch")
    frozen = copy.deepcopy(teacher)
    _, _, generator, report = run(teacher, "gkt")
    assert report["bn-statistics"] == 1.0 and parameters_equal(teacher, frozen)
    assert not parameters_equal(generator, Generator(8, 2, 1, 28, (0.5,), (0.25,)))  # the generator trained


def test_relearn_steps_count_until_the_goal_and_the_index_divides_them():
    calls = []

    def evaluate(_model):
        calls.append(1)
        return len(calls) / 4  # reaches 0.75 at the third evaluation

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    steps = relearn_steps(model, torch.randn(8, 1, 2, 2), torch.randint(2, (8,)), 0.75, evaluate, seed=0)
    assert steps == 3
    assert relearn_steps(model, torch.randn(8, 1, 2, 2), torch.randint(2, (8,)), 2.0, lambda m: 0.0, seed=0,
                         max_steps=5) == 5
    assert anamnesis_index(6, 3) == 2.0
