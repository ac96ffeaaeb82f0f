"""Outputs of a run under ``output-dir/<experiment>/``: results.json, checkpoint, plot.

``results.json`` holds the resolved config, the federation, one record per stage
(name, rounds, seconds, samples, accuracy per class) and the per-round history; it
is rewritten atomically after every stage, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import protocol
from ..atomic import atomic_write_bytes, atomic_write_text
from ..core.distillation import synthetic_count
from ..errors import RequestError
from ..resources import peak_memory_mb
from .evaluation import RoundRecord, SplitAccuracy
from .federation import ClientInfo
from .stages import StageCost

RESULTS_FILE = "results.json"
CHECKPOINT_FILE = "model.pt"
TRAINED_CHECKPOINT_FILE = "model-trained.pt"
PLOT_FILE = "class_accuracy.png"
CHECKPOINT_FORMAT_VERSION = 1


@dataclass
class StageRecord:  # pylint: disable=too-many-instance-attributes
    """Cost and outcome of one stage.

    ``seconds`` is the wall time of the stage's federated work (sending the model,
    local work, aggregation); server-side test evaluation is ``eval-seconds``.
    ``samples`` is the number of samples the stage's clients trained on in one round
    (the paper's "data size"); ``sample-gradients`` counts per-sample gradient
    computations over all rounds; ``bytes`` the model parameters sent between server
    and clients, both ways. ``forget-accuracy`` / ``retain-accuracy`` (F-Set /
    R-Set) refer to the request the stage serves (``request``, an index into
    ``requests``); ``run`` indexes ``runs``. ``client-peak-mb`` / ``server-peak-mb``: the
    largest peak memory of a client process, and the server process's, by the stage's end.
    ``details``: what a stage reports of its own work (e.g. a data-free stage: the share of
    generated samples kept).
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
    run: int = 0
    request: int | None = None
    split: SplitAccuracy | None = None
    bytes: int = 0
    compute_seconds: float = 0.0
    distill_seconds: float = 0.0
    client_peak_mb: float = 0.0
    server_peak_mb: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON form with the app's kebab-case keys."""
        split = self.split or SplitAccuracy(None, None)
        return {
            "name": self.name,
            "run": self.run,
            "request": self.request,
            "rounds": self.rounds,
            "first-round": self.first_round,
            "last-round": self.last_round,
            "seconds": self.seconds,
            "eval-seconds": self.eval_seconds,
            "samples": self.samples,
            "sample-gradients": self.sample_gradients,
            "bytes": self.bytes,
            "compute-seconds": self.compute_seconds,
            "distill-seconds": self.distill_seconds,
            "client-peak-mb": self.client_peak_mb,
            "server-peak-mb": self.server_peak_mb,
            "accuracy": self.accuracy,
            **split.as_dict(),
            "class-accuracy": list(self.class_accuracy),
            **({"details": dict(self.details)} if self.details else {}),
        }

    @classmethod
    def from_cost(cls, name: str, cost: StageCost, **outcome: Any) -> StageRecord:
        """The record of a stage that ran: its cost, and its outcome (accuracy, rounds, split, ...)."""
        return cls(name=name, rounds=cost.rounds, seconds=cost.seconds, samples=cost.samples,
                   sample_gradients=cost.sample_gradients, bytes=cost.bytes_sent + cost.bytes_received,
                   compute_seconds=cost.compute_seconds, distill_seconds=cost.distill_seconds,
                   client_peak_mb=cost.client_peak_mb, server_peak_mb=peak_memory_mb(),
                   details=dict(cost.details), **outcome)

    def summary(self) -> str:
        """One line for the log."""
        return (f"{self.rounds} rounds in {self.seconds:.2f} s (+{self.eval_seconds:.1f} s evaluation), "
                f"{self.samples} samples, test accuracy {100 * self.accuracy:.2f}%{_split_text(self.split)}")

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> StageRecord:
        """Inverse of :meth:`as_dict`."""
        return cls(
            name=entry["name"], rounds=entry["rounds"], seconds=entry["seconds"],
            eval_seconds=entry["eval-seconds"], samples=entry["samples"],
            sample_gradients=entry["sample-gradients"], accuracy=entry["accuracy"],
            class_accuracy=tuple(entry["class-accuracy"]), first_round=entry["first-round"],
            last_round=entry["last-round"], run=entry["run"], request=entry["request"],
            split=SplitAccuracy(entry["forget-accuracy"], entry["retain-accuracy"]), bytes=entry.get("bytes", 0),
            compute_seconds=entry.get("compute-seconds", 0.0), distill_seconds=entry.get("distill-seconds", 0.0),
            client_peak_mb=entry.get("client-peak-mb", 0.0), server_peak_mb=entry.get("server-peak-mb", 0.0),
            details=entry.get("details", {}),
        )


@dataclass
class ExperimentRecord:
    """Everything results.json holds: the experiment's runs, stages, requests and rounds.

    A run that serves requests from a stored checkpoint (``phase`` unlearn or relearn)
    adds to the record of the run that trained the model; training starts a new one.
    """

    config: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    federation: dict[str, Any] = field(default_factory=dict)
    stores: dict[str, Any] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "config": self.config,
            "runs": self.runs,
            "federation": self.federation,
            "stores": self.stores,
            "stages": [stage.as_dict() for stage in self.stages],
            "requests": self.requests,
            "rounds": [entry.as_dict() for entry in self.rounds],
        }

    @classmethod
    def load(cls, output_path: Path) -> ExperimentRecord | None:
        """The record in ``output_path/results.json``, or None if there is none."""
        path = output_path / RESULTS_FILE
        if not path.is_file():
            return None
        content = json.loads(path.read_text())
        return cls(
            config=content["config"],
            runs=content.get("runs", []),
            federation=content.get("federation", {}),
            stores=content.get("stores", {}),
            stages=[StageRecord.from_dict(stage) for stage in content.get("stages", [])],
            requests=content.get("requests", []),
            rounds=[RoundRecord.from_dict(entry) for entry in content.get("rounds", [])],
        )

    def stage_seconds(self, name: str) -> float:
        """Seconds of the most recent stage of that name (0 if none)."""
        return next((stage.seconds for stage in reversed(self.stages) if stage.name == name), 0.0)


PRIVACY_KEYS = (protocol.SYNTHETIC_NEAREST, protocol.SYNTHETIC_NEAREST_MIN, protocol.SYNTHETIC_COPIES)


def stores_summary(clients: list[ClientInfo], metrics_by_node: dict[int, Mapping[str, Any]],
                   scale: int) -> dict[str, Any]:
    """What results.json's ``stores`` says of the clients' stores: their sizes (``store-bytes``
    of each client's metrics) and, for QuickDrop's synthetic sets, how many images they hold,
    what fraction of the data that is and, where the clients reported it at the end of
    training, how close the synthetic images stay to their real images (per client)."""
    synthetic = [sum(synthetic_count(n, scale) for n in c.class_counts if n) for c in clients]
    data = sum(c.num_examples for c in clients)
    metrics = [metrics_by_node.get(c.node_id, {}) for c in clients]
    summary = {
        "bytes": [int(m.get(protocol.STORE_BYTES, 0)) for m in metrics],
        "synthetic-images": synthetic,
        "augmentation-images": synthetic,
        "synthetic-fraction": sum(synthetic) / data if data else 0.0,
    }
    if any(protocol.SYNTHETIC_NEAREST in m for m in metrics):
        summary |= {key: [m.get(key) for m in metrics] for key in PRIVACY_KEYS}
    return summary


def write_results(output_path: Path, record: ExperimentRecord) -> Path:
    """Write results.json atomically; returns its path."""
    path = output_path / RESULTS_FILE
    atomic_write_text(path, json.dumps(record.as_dict(), indent=2, allow_nan=False) + "\n")
    return path


def save_checkpoint(
    output_path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], name: str = CHECKPOINT_FILE
) -> Path:
    """Save a global model with the metadata needed to check it fits a later run."""
    buffer = io.BytesIO()
    content = {"format-version": CHECKPOINT_FORMAT_VERSION, "state-dict": state_dict, **metadata}
    torch.save({**content, "checksum": _checksum(content)}, buffer)
    path = output_path / name
    atomic_write_bytes(path, buffer.getvalue())
    return path


def model_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes and values, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def _checksum(content: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's model (:func:`model_digest`) and metadata."""
    metadata = {key: value for key, value in content.items() if key not in ("state-dict", "checksum")}
    text = model_digest(content["state-dict"]) + json.dumps(metadata, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_checkpoint(output_path: Path, name: str = CHECKPOINT_FILE) -> dict[str, Any]:
    """The checkpoint's contents (``state-dict`` and metadata), checked against its checksum.

    Raises
    ------
    RequestError
        If there is no checkpoint, it cannot be read, it does not match its checksum, or it
        is of another format version; the message says what to do.
    """
    path = output_path / name
    if not path.is_file():
        raise RequestError(f"no trained model at {path}: run phase=train (or all) for this experiment first")
    remedy = "restore this experiment's own file, or train a new model with phase=train"
    try:
        content = torch.load(path, weights_only=True)
        if not isinstance(content, dict):
            raise TypeError(f"it holds a {type(content).__name__}")
        damaged = "checksum" in content and content.pop("checksum") != _checksum(content)
    except Exception as exc:  # pylint: disable=broad-exception-caught  # any damage torch or pickle meets
        raise RequestError(f"{path} cannot be read as a checkpoint ({exc.__class__.__name__}: {exc}): {remedy}") from exc
    if damaged:
        raise RequestError(f"{path} is damaged: its contents do not match the checksum saved with them; {remedy}")
    if content.get("format-version") != CHECKPOINT_FORMAT_VERSION:
        raise RequestError(f"{path} has checkpoint format {content.get('format-version')}, this app reads "
                           f"{CHECKPOINT_FORMAT_VERSION}: {remedy}")
    return content


def check_checkpoint(checkpoint: dict[str, Any], output_path: Path, identity: dict[str, Any],
                     method_name: str, global_model: bool) -> None:
    """Refuse a checkpoint of another dataset, model or experiment, or one trained by the other kind of
    method (one global model, or none: HDUS's clients keep their own)."""
    trained_global = checkpoint.get("global-model", True)
    if trained_global != global_model:
        trained = "with one global model" if trained_global else "without a global model (e.g. by method='hdus')"
        needs = "one" if global_model else "the clients' own models"
        raise RequestError(f"the experiment in {output_path} was trained {trained}; method={method_name!r} needs "
                           f"{needs}: serve it with a method of the kind that trained it, or train a new experiment")
    for key, value in identity.items():
        if checkpoint.get(key) != value:
            remedy = ("it belongs to another experiment: restore this experiment's own file, or train it with "
                      "phase=train") if key == "experiment" else (
                "run with the settings it was trained with, or train it again with phase=train")
            raise RequestError(f"the model in {output_path} was trained with {key} {checkpoint.get(key)!r}, "
                               f"this run has {value!r}: {remedy}")


def entry_summary(entry: dict[str, Any]) -> str:
    """One line for the log: a served request's F-Set / R-Set before and after each stage, and its seconds."""
    parts = []
    for key, value in entry.items():
        if (key == "before" or key.startswith("after-")) and value:
            parts.append(f"{key} F {_percent(value['forget-accuracy'])} R {_percent(value['retain-accuracy'])}")
    parts.append(f"{entry['total-seconds']:.2f} s")
    return "; ".join(parts)


def _split_text(split: SplitAccuracy | None) -> str:
    if split is None:
        return ""
    return f", F-Set {_percent(split.forget)}, R-Set {_percent(split.retain)}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def plot_class_accuracy(output_path: Path, rounds: list[RoundRecord], class_names: list[str]) -> Path:
    """Per-class test accuracy per round across all stages (cf. QuickDrop paper, Fig. 2)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    figure, axes = plt.subplots(figsize=(9, 4.5))
    draw_class_accuracy(axes, rounds, class_names)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    path = output_path / PLOT_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def draw_class_accuracy(axes, rounds: list[RoundRecord], class_names: list[str]) -> None:
    """One line per class over the rounds on matplotlib ``axes``, every stage but training shaded."""
    steps = [entry.round for entry in rounds]
    for index, name in enumerate(class_names):
        axes.plot(steps, [100 * entry.class_accuracy[index] for entry in rounds], marker="o", markersize=3,
                  label=name)
    _shade_stages(axes, rounds)
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy per class (%)")
    axes.set_ylim(-2, 102)
    axes.legend(loc="lower right", fontsize="small", ncol=2)


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
