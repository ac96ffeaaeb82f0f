"""Outputs of a run under ``output-dir/<experiment>/``: results.json, checkpoint, plot.

``results.json`` holds the resolved config, the federation, one record per stage
(name, rounds, seconds, samples, accuracy per class) and the per-round history; it
is rewritten atomically after every stage, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_bytes, atomic_write_text
from .evaluation import RoundRecord

RESULTS_FILE = "results.json"
CHECKPOINT_FILE = "model.pt"
PLOT_FILE = "class_accuracy.png"
CHECKPOINT_FORMAT_VERSION = 1


@dataclass
class StageRecord:  # pylint: disable=too-many-instance-attributes
    """Cost and outcome of one stage.

    ``seconds`` is the wall time of the stage's federated work (sending the model,
    local work, aggregation); server-side test evaluation is ``eval-seconds``.
    ``samples`` is the number of samples the stage's clients trained on in one round
    (the paper's "data size"); ``sample-gradients`` counts per-sample gradient
    computations over all rounds.
    """

    name: str
    rounds: int
    seconds: float
    eval_seconds: float
    samples: int
    sample_gradients: int
    accuracy: float
    class_accuracy: tuple[float, ...]
    first_round: int
    last_round: int

    def as_dict(self) -> dict[str, Any]:
        """JSON form with the app's kebab-case keys."""
        return {
            "name": self.name,
            "rounds": self.rounds,
            "first-round": self.first_round,
            "last-round": self.last_round,
            "seconds": self.seconds,
            "eval-seconds": self.eval_seconds,
            "samples": self.samples,
            "sample-gradients": self.sample_gradients,
            "accuracy": self.accuracy,
            "class-accuracy": list(self.class_accuracy),
        }


@dataclass
class ExperimentRecord:
    """Everything results.json holds."""

    config: dict[str, Any]
    federation: dict[str, Any] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "config": self.config,
            "federation": self.federation,
            "stages": [stage.as_dict() for stage in self.stages],
            "rounds": [entry.as_dict() for entry in self.rounds],
        }


def write_results(output_path: Path, record: ExperimentRecord) -> Path:
    """Write results.json atomically; returns its path."""
    path = output_path / RESULTS_FILE
    atomic_write_text(path, json.dumps(record.as_dict(), indent=2, allow_nan=False) + "\n")
    return path


def save_checkpoint(output_path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Save the global model with the metadata needed to check it fits a later run."""
    buffer = io.BytesIO()
    torch.save({"format-version": CHECKPOINT_FORMAT_VERSION, "state-dict": state_dict, **metadata}, buffer)
    path = output_path / CHECKPOINT_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_class_accuracy(output_path: Path, rounds: list[RoundRecord], class_names: list[str]) -> Path:
    """Per-class test accuracy per round across all stages (cf. QuickDrop paper, Fig. 2)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    figure, axes = plt.subplots(figsize=(9, 4.5))
    steps = [entry.round for entry in rounds]
    for index, name in enumerate(class_names):
        values = [100 * entry.class_accuracy[index] for entry in rounds]
        axes.plot(steps, values, marker="o", markersize=3, label=name)
    _shade_stages(axes, rounds)
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy per class (%)")
    axes.set_ylim(-2, 102)
    axes.legend(loc="lower right", fontsize="small", ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    path = output_path / PLOT_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _shade_stages(axes, rounds: list[RoundRecord]) -> None:
    """Shade and label the span of every stage other than training."""
    spans: list[tuple[str, int, int]] = []
    for entry in rounds:
        if spans and spans[-1][0] == entry.stage:
            spans[-1] = (entry.stage, spans[-1][1], entry.round)
        else:
            spans.append((entry.stage, entry.round, entry.round))
    palette = ["tab:blue", "tab:olive", "tab:green", "tab:purple", "tab:brown"]
    colours: dict[str, str] = {}
    for stage, first, last in spans:
        if stage == "train":
            continue
        colour = colours.setdefault(stage, palette[len(colours) % len(palette)])
        axes.axvspan(first - 0.5, last + 0.5, color=colour, alpha=0.15, lw=0)
        axes.text((first + last) / 2, 101, stage, ha="center", va="bottom", fontsize="x-small")
