"""Stages: the units of work that train a model or serve a request, in three shapes.

Every stage has a ``name`` and a ``run(grid, arrays, num_rounds, evaluate_fn)`` that
returns the new global model and one :class:`StageCost`. The shapes:

- federated (:class:`~qd_app.server.strategies.StageStrategy`): FedAvg-style rounds that
  send the global model to chosen clients and aggregate their replies;
- server-only (:class:`ServerStage`): the server computes the new model alone and sends
  no message (data-free unlearning);
- relay (:class:`RelayStage`): messages addressed per destination, each reply passed on
  or kept by the clients, nothing aggregated and no global model changed (decentralised
  methods).

A method's recipe is a list of :class:`StagePlan`: how to build each stage when its
turn comes, for how many rounds, and from which model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any, Protocol

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from .. import protocol

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class StageCost:  # pylint: disable=too-many-instance-attributes
    """What one stage cost, whatever its shape.

    ``seconds`` is the wall time of the stage's work (server-side test evaluation
    excluded); ``samples`` the most samples its clients trained on in one round;
    ``sample_gradients`` the per-sample gradient computations over all rounds;
    ``bytes_sent`` / ``bytes_received`` the model parameters that went to and came from
    clients; ``compute_seconds`` the clients' own local work (for a server-only stage,
    the server's), ``distill_seconds`` the part of it spent on synthetic images;
    ``client_peak_mb`` the largest peak memory a client process reported;
    ``details`` what a stage reports of its own work (recorded with the stage);
    ``evaluation`` the test accuracy, overall and per class, of a stage whose outcome the
    clients evaluate (a method without a global model: the mean over the clients' models).
    """

    rounds: int = 0
    seconds: float = 0.0
    samples: int = 0
    sample_gradients: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    compute_seconds: float = 0.0
    distill_seconds: float = 0.0
    client_peak_mb: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    evaluation: tuple[float, tuple[float, ...]] | None = None

    def add_client_work(self, metrics: Iterable[Mapping[str, Any]]) -> None:
        """Count the clients' reported compute seconds and keep the largest peak memory."""
        metrics = list(metrics)
        self.compute_seconds += sum(float(m.get(protocol.COMPUTE_SECONDS, 0.0)) for m in metrics)
        self.client_peak_mb = max([self.client_peak_mb, *(float(m.get(protocol.PEAK_MEMORY, 0.0)) for m in metrics)])


class Stage(Protocol):
    """What the orchestration runs: one stage of training or of serving a request."""

    stage_name: str

    def run(
        self, grid: Grid, arrays: ArrayRecord, num_rounds: int, evaluate_fn: EvaluateFn
    ) -> tuple[ArrayRecord, StageCost]:
        """Run up to ``num_rounds`` rounds from the global model ``arrays``; return the
        new global model and the stage's cost. ``evaluate_fn(round, model)`` is called
        with round 0 before the first round and after every round."""


@dataclass(frozen=True)
class StagePlan:
    """A stage of a recipe: how to build it (when its turn comes, so it can use what the
    stages before it left), its rounds (0: skipped), the model it starts from (``None``:
    the current global model), and whether it is needed once the stages before it ran
    (``None``: always; e.g. no recovery after an ascent that took no step)."""

    build: Callable[[], Stage]
    rounds: int
    start: Callable[[ArrayRecord], ArrayRecord] | None = None
    needed: Callable[[], bool] | None = None


class ServerStage:
    """A stage the server runs alone: no message is sent, so it costs zero bytes.

    Subclasses implement :meth:`update`, one round of server-side work on the global
    model (e.g. generator training and distillation for data-free unlearning). Its wall
    time counts as the stage's ``seconds`` and ``compute_seconds``; a subclass may add
    ``samples`` and ``sample_gradients`` to :attr:`cost` as it goes.
    """

    stage_name = "server"

    def __init__(self) -> None:
        self.cost = StageCost()

    def update(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round of work: the new global model from the current one."""
        raise NotImplementedError

    def run(
        self, grid: Grid, arrays: ArrayRecord, num_rounds: int, evaluate_fn: EvaluateFn
    ) -> tuple[ArrayRecord, StageCost]:  # pylint: disable=unused-argument
        """Run :meth:`update` ``num_rounds`` times, evaluating after each."""
        evaluate_fn(0, arrays)
        for server_round in range(1, num_rounds + 1):
            started = time.perf_counter()
            arrays = self.update(server_round, arrays)
            seconds = time.perf_counter() - started
            self.cost.rounds += 1
            self.cost.seconds += seconds
            self.cost.compute_seconds += seconds
            log(INFO, "%s round %s (server only) took %.1f s", self.stage_name, server_round, seconds)
            evaluate_fn(server_round, arrays)
        return arrays, self.cost


class ResetStage(ServerStage):
    """The exact answer to a request that leaves no data to keep: the model training
    starts from (Retrain-Or, with nothing to train on, returns it unchanged)."""

    stage_name = "reset"

    def __init__(self, initial_model: Callable[[], ArrayRecord]) -> None:
        super().__init__()
        self.initial_model = initial_model

    def update(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The initial model, whatever ``arrays`` is."""
        return self.initial_model()


class RelayStage:
    """A stage that addresses messages per destination and aggregates nothing.

    Each round, :meth:`messages` builds the round's messages (each with its own
    destination and content, e.g. another client's small model to keep); the replies
    go to :meth:`receive`, which may queue what the next round forwards. The server
    keeps nothing beyond the round that forwards it, and the global model passed in is
    returned unchanged. Every array sent or received counts in :attr:`cost`.
    """

    stage_name = "relay"

    def __init__(self) -> None:
        self.cost = StageCost()

    def messages(self, server_round: int, grid: Grid) -> Iterable[Message]:
        """The messages of this round (none: the stage ends)."""
        raise NotImplementedError

    def receive(self, server_round: int, replies: list[Message]) -> None:
        """Handle this round's replies (e.g. queue what the next round forwards)."""
        raise NotImplementedError

    def run(
        self, grid: Grid, arrays: ArrayRecord, num_rounds: int, evaluate_fn: EvaluateFn
    ) -> tuple[ArrayRecord, StageCost]:
        """Send each round's messages, hand over the replies; stop early when a round has none."""
        evaluate_fn(0, arrays)
        for server_round in range(1, num_rounds + 1):
            started = time.perf_counter()
            messages = list(self.messages(server_round, grid))
            if not messages:
                break
            self.cost.bytes_sent += sum(array_bytes(message) for message in messages)
            replies = list(grid.send_and_receive(messages))
            answered = [reply for reply in replies if not reply.has_error()]
            self.cost.bytes_received += sum(array_bytes(reply) for reply in answered)
            self.cost.add_client_work(m for reply in answered for m in reply.content.metric_records.values())
            self.receive(server_round, replies)
            self.cost.rounds += 1
            self.cost.seconds += time.perf_counter() - started
            log(INFO, "%s round %s: %s messages relayed", self.stage_name, server_round, len(messages))
        return arrays, self.cost


def array_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries."""
    return sum(record.count_bytes() for record in message.content.array_records.values())
