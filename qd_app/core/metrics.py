"""Unlearning metrics beyond accuracy (plain torch): membership inference, tug-of-war, divergence.

- Population membership inference (as in SalUn and sparse-unlearning work): a
  logistic regression on softmax confidence features learns retain-train samples
  (members) against test samples (non-members); applied to the forget set, the
  fraction it calls members says how much of it the model still "remembers". It also
  calls unseen samples of classes the model is confident on members, so a client request
  compares it with its rate on unseen (test) samples of the client's classes.
- Tug-of-war (ToW) against Retrain-Or: the product over forget, retain and test of
  (1 - |acc - acc_retrain|); 1.0 is indistinguishable from retraining by accuracy.
- Output divergence: mean KL(p_retrain || p_model) of the softmax outputs on the test set.
- Anamnesis Index (AIN): steps of fine-tuning on the forget data until the forgotten
  accuracy returns to 95 % of the original model's, over the same for Retrain-Or's model
  (about 1: the knowledge is gone; well below 1: it was only hidden).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def confidence_features(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: probability of the true class, largest probability, entropy, loss."""
    probabilities = torch.softmax(logits.double(), dim=1)
    true_class = probabilities[torch.arange(len(labels)), labels]
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=1)
    loss = -torch.log(true_class.clamp_min(1e-12))
    return torch.stack([true_class, probabilities.max(dim=1).values, entropy, loss], dim=1)


def fit_logistic_regression(features: torch.Tensor, targets: torch.Tensor, steps: int = 300):
    """A standardised logistic regression fitted by L-BFGS; returns a predictor of P(target=1)."""
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-8)
    x = (features - mean) / std
    weights = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros((), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weights + bias, targets.to(x.dtype))
        loss = loss + 1e-4 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weights, bias = weights.detach(), bias.detach()
    return lambda f: torch.sigmoid(((f - mean) / std) @ weights + bias)


def membership_attack(
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    seed: int = 0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An attack trained on members vs non-members (logits, labels); returns a function of
    (logits, labels) that says, per sample, whether the attack calls it a member.

    The attack is trained on equally many members and non-members (the larger group
    is subsampled with ``seed``).
    """
    member_features = confidence_features(*members)
    non_member_features = confidence_features(*non_members)
    size = min(len(member_features), len(non_member_features))
    generator = torch.Generator().manual_seed(seed)
    member_features = member_features[torch.randperm(len(member_features), generator=generator)[:size]]
    non_member_features = non_member_features[torch.randperm(len(non_member_features), generator=generator)[:size]]
    features = torch.cat([member_features, non_member_features])
    labels = torch.cat([torch.ones(size), torch.zeros(size)])
    predict = fit_logistic_regression(features, labels)
    return lambda logits, labels: predict(confidence_features(logits, labels)) > 0.5


def tug_of_war(accuracies: dict[str, float], retrain_accuracies: dict[str, float]) -> float:
    """Prod over forget, retain and test of (1 - |acc - acc_retrain|), accuracies as fractions."""
    return math.prod(1.0 - abs(accuracies[key] - retrain_accuracies[key]) for key in ("forget", "retain", "test"))


def output_kl(logits: torch.Tensor, retrain_logits: torch.Tensor) -> float:
    """Mean KL(p_retrain || p_model) over samples."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    log_q = torch.log_softmax(retrain_logits.double(), dim=1)
    return float((log_q.exp() * (log_q - log_p)).sum(dim=1).mean())


def relearn_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, goal: float,
                  evaluate: Callable[[nn.Module], float], seed: int, batch_size: int = 256,
                  lr: float = 1e-3, max_steps: int = 200, every: int = 1) -> int:
    """Fine-tuning steps (Adam) on the forget data until ``evaluate(model)`` reaches ``goal``:
    the numerator and denominator of the Anamnesis Index; ``max_steps`` if never reached.
    ``model`` is changed; pass a copy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    random = torch.Generator().manual_seed(seed)
    for step in range(1, max_steps + 1):
        batch = torch.randint(len(images), (min(batch_size, len(images)),), generator=random)
        model.train()
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            model.eval()
            if evaluate(model) >= goal:
                return step
    return max_steps


def anamnesis_index(unlearned_steps: int, retrained_steps: int) -> float:
    """AIN = relearning steps of the unlearned model over those of Retrain-Or's (ideal about 1)."""
    return unlearned_steps / retrained_steps if retrained_steps else math.nan
