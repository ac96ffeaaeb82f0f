"""Membership inference, tug-of-war and output divergence (plain torch)."""

from __future__ import annotations

import math

import pytest
import torch

from qd_app.core.metrics import confidence_features, membership_attack, output_kl, tug_of_war


def test_tug_of_war_by_hand():
    retrain = {"forget": 0.0, "retain": 0.9, "test": 0.8}
    assert tug_of_war(retrain, retrain) == 1.0
    model = {"forget": 0.1, "retain": 0.85, "test": 0.8}
    assert tug_of_war(model, retrain) == pytest.approx(0.9 * 0.95 * 1.0)


def test_output_kl_is_zero_for_equal_outputs_and_positive_otherwise():
    logits = torch.randn(50, 10)
    assert output_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    uniform = torch.zeros(1, 2)
    certain = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert output_kl(certain, uniform) == pytest.approx(expected)


def test_confidence_features_by_hand():
    features = confidence_features(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1]))
    assert features[0, 0].item() == pytest.approx(0.75) and features[0, 1].item() == pytest.approx(0.75)
    assert features[0, 3].item() == pytest.approx(-math.log(0.75))


def test_membership_attack_calls_whatever_the_model_is_confident_on_members():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=generator)

    def logits(confidence):
        out = torch.randn(400, 10, generator=generator)
        out[torch.arange(400), labels] += confidence
        return out

    attack = membership_attack((logits(8.0), labels), (logits(0.5), labels))
    # fresh samples, never shown to the attack: confident ones are called members, uncertain ones not.
    # Confidence, not membership, is what it sees, so a client request compares the client's data
    # with unseen data of the client's classes (the bench's mia-gap)
    confident, uncertain = attack(logits(8.0), labels), attack(logits(0.5), labels)
    assert confident.dtype == torch.bool
    assert float(confident.double().mean()) > 0.9 and float(uncertain.double().mean()) < 0.1
