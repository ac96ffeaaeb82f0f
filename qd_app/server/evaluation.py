"""Evaluation of global models: on the test set per class (server side), and on the clients' own data.

The :class:`ServerEvaluator` gives each stage an ``evaluate_fn``: it numbers rounds
across stages (so one plot spans the whole experiment) and keeps the history as
:class:`RoundRecord` entries. F-Set / R-Set accuracy of a request comes from
:func:`class_split` (test set) or :func:`client_split` (:func:`evaluate_on_clients`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from .. import protocol
from ..config import RunConfig
from ..core.data import dataset_spec, evaluation_split
from ..core.models import ModelSpec, build_model
from ..core.training import logits, per_class_accuracy
from ..core.unlearning import class_loss_quantiles
from ..errors import StageFailedError
from ..request import UnlearningRequest
from .federation import Federation


@dataclass(frozen=True)
class RoundRecord:
    """Test accuracy of the global model after one round of a stage."""

    round: int
    stage: str
    accuracy: float
    class_accuracy: tuple[float, ...]

    def as_dict(self) -> dict:
        """JSON form with the app's kebab-case keys."""
        return {
            "round": self.round,
            "stage": self.stage,
            "accuracy": self.accuracy,
            "class-accuracy": list(self.class_accuracy),
        }

    @classmethod
    def from_dict(cls, entry: dict) -> RoundRecord:
        """Inverse of :meth:`as_dict`."""
        return cls(entry["round"], entry["stage"], entry["accuracy"], tuple(entry["class-accuracy"]))


@dataclass(frozen=True)
class SplitAccuracy:
    """F-Set and R-Set accuracy: on the forgotten data and on the data that remains.

    ``None`` where the set is empty (e.g. the R-Set once every class is forgotten).
    """

    forget: float | None
    retain: float | None

    def as_dict(self) -> dict[str, float | None]:
        """JSON form."""
        return {"forget-accuracy": self.forget, "retain-accuracy": self.retain}


def pooled_accuracy(correct: dict[int, float], totals: dict[int, int], keys: set[int]) -> float | None:
    """Accuracy over the union of some groups (classes or clients), given per-group counts."""
    total = sum(totals[key] for key in keys)
    return sum(correct[key] for key in keys) / total if total else None


def class_split(
    class_accuracy: tuple[float, ...], class_sizes: list[int], forget: set[int], forgotten: set[int]
) -> SplitAccuracy:
    """Class-level F/R: test accuracy on the ``forget`` classes and on the classes not ``forgotten``."""
    totals = dict(enumerate(class_sizes))
    correct = {c: (0.0 if math.isnan(a) else a) * totals[c] for c, a in enumerate(class_accuracy)}
    remaining = set(totals) - forgotten - forget
    return SplitAccuracy(pooled_accuracy(correct, totals, forget), pooled_accuracy(correct, totals, remaining))


def client_split(
    correct: dict[int, float], totals: dict[int, int], forget: set[int], forgotten: set[int]
) -> SplitAccuracy:
    """Client-level F/R: accuracy on the ``forget`` clients' own data and on the other clients' data."""
    remaining = set(totals) - forgotten - forget
    return SplitAccuracy(pooled_accuracy(correct, totals, forget), pooled_accuracy(correct, totals, remaining))


def accuracy_metrics(accuracy: float, class_accuracy: tuple[float, ...]) -> MetricRecord:
    """The MetricRecord form of an evaluation (NaN classes, absent from the data, as -1)."""
    return MetricRecord(
        {
            "accuracy": accuracy,
            "class-accuracy": [-1.0 if math.isnan(a) else a for a in class_accuracy],
        }
    )


class ServerEvaluator:
    """Evaluates global models on the test split and records the per-round history."""

    def __init__(self, config: RunConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.data = evaluation_split(config)
        self.num_classes = dataset_spec(config.dataset).num_classes
        self.class_sizes = self.data.class_counts(self.num_classes)
        # channels-last: the same outputs, convolutions faster (on CPU, twice with batch norm)
        self.model = build_model(ModelSpec.from_config(config)).to(device, memory_format=torch.channels_last)
        self.history: list[RoundRecord] = []
        self.seconds = 0.0
        self._last: tuple[ArrayRecord, torch.Tensor] | None = None  # the last model and its test outputs

    @property
    def last_round(self) -> int:
        """Global index of the last evaluated round (0 before any stage ran)."""
        return self.history[-1].round if self.history else 0

    def evaluate(self, arrays: ArrayRecord) -> tuple[float, tuple[float, ...]]:
        """Overall and per-class test accuracy of a model (reused if the last evaluation was of
        this very model, e.g. after a round that left it unchanged)."""
        outputs = self._outputs(arrays)
        predictions = outputs.argmax(dim=1)
        accuracy = float((predictions == self.data.labels).float().mean())
        return accuracy, tuple(per_class_accuracy(predictions, self.data.labels, self.num_classes))

    def loss_quantiles(self, arrays: ArrayRecord) -> list[float]:
        """Quantiles of a model's capped loss on the test images of each class: how it fits
        data it never trained on (the goal of client-level ascent)."""
        return class_loss_quantiles(self._outputs(arrays), self.data.labels, self.num_classes)

    def _outputs(self, arrays: ArrayRecord) -> torch.Tensor:
        if self._last is None or self._last[0] is not arrays:
            started = time.perf_counter()
            self.model.load_state_dict(arrays.to_torch_state_dict())
            self._last = (arrays, logits(self.model, self.data.images, self.config.eval_batch_size, self.device))
            self.seconds += time.perf_counter() - started
        return self._last[1]

    def record(self, stage: str, rounds: int, accuracy: float, class_accuracy: tuple[float, ...]) -> None:
        """Record an evaluation the clients made of a stage's outcome (no global model to evaluate)."""
        self.history.append(RoundRecord(self.last_round + rounds, stage, accuracy, class_accuracy))

    def for_stage(self, stage: str) -> Callable[[int, ArrayRecord], MetricRecord]:
        """An ``evaluate_fn`` for one stage; round 0 is recorded only for the first stage of all."""
        offset = self.last_round

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if server_round == 0 and self.history:
                last = self.history[-1]
                return accuracy_metrics(last.accuracy, last.class_accuracy)
            accuracy, classes = self.evaluate(arrays)
            self.history.append(RoundRecord(offset + server_round, stage, accuracy, classes))
            log(
                INFO,
                "[%s] round %s: test accuracy %.2f%% (lowest class %.2f%%)",
                stage,
                server_round,
                100 * accuracy,
                100 * min((a for a in classes if not math.isnan(a)), default=math.nan),
            )
            return accuracy_metrics(accuracy, classes)

        return evaluate_fn


def evaluate_on_clients(grid: Grid, federation: Federation, arrays: ArrayRecord) -> tuple[dict[int, float],
                                                                                         dict[int, int]]:
    """Every client's correct predictions and sample count on its own training data (by partition)."""
    content = RecordDict({protocol.ARRAYS: arrays})
    messages = [Message(content, dst_node_id=node, message_type=protocol.EVALUATE) for node in federation.node_ids]
    correct, totals = {}, {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise StageFailedError(f"client evaluation failed: {reply.error.reason}")
        metrics = reply.content[protocol.METRICS]
        partition = federation.partition_of(reply.metadata.src_node_id)
        correct[partition], totals[partition] = float(metrics[protocol.CORRECT]), int(metrics[protocol.NUM_EXAMPLES])
    return correct, totals


def request_split(evaluator: ServerEvaluator, grid: Grid, federation: Federation, arrays: ArrayRecord,
                  request: UnlearningRequest, excluded_classes: set[int], forgotten_clients: set[int]) -> SplitAccuracy:
    """F-Set/R-Set accuracy of a model for ``request`` (class-level: test set; client-level: client data)."""
    if request.kind == "class":
        classes = evaluator.evaluate(arrays)[1]
        return class_split(classes, evaluator.class_sizes, set(request.targets), excluded_classes)
    correct, totals = evaluate_on_clients(grid, federation, arrays)
    return client_split(correct, totals, set(request.targets), forgotten_clients)
