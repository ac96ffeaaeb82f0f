"""Weighted model averages and FedEraser's calibrated updates (plain torch)."""

from __future__ import annotations

import torch

from .models import StateDict


def calibrated_update(new: StateDict, old: StateDict) -> StateDict:
    """FedEraser's calibration, per parameter tensor: the new direction with the old norm."""
    calibrated = {}
    for key, value in new.items():
        norm = value.float().norm()
        calibrated[key] = value * (old[key].float().norm() / norm) if norm > 0 else torch.zeros_like(value)
    return calibrated


def weighted_sum(updates: list[StateDict], weights: list[float]) -> StateDict:
    """Sum of the updates weighted by ``weights`` normalised to 1."""
    total = sum(weights)
    return {key: sum(update[key].double() * (w / total) for update, w in zip(updates, weights)).float()
            for key in updates[0]}
