"""Federated stages: FedAvg over chosen clients, with a message type of its own and its cost.

Every federated stage of every method (training, unlearning, recovery, relearning and the
baselines' stages) is a :class:`StageStrategy` subclass, in the style of
``flwr.serverapp.strategy``: small hooks to override (:meth:`~StageStrategy.select_nodes`,
``configure_train``, ``aggregate_train``) and the stage's settings merged into every message.
The stages every method shares (training, recovery, relearning) are here too; a method
names the classes it uses in class attributes, so a subclass can swap one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .. import protocol
from ..errors import StageFailedError
from .federation import Federation
from .stages import EvaluateFn, StageCost, array_bytes

StageConfig = dict[str, int | float | str | bool | list[int] | list[float]]


class StageStrategy(FedAvg):
    """FedAvg over chosen nodes of a :class:`Federation`, accounting for one stage.

    Parameters
    ----------
    federation : Federation
        The nodes taking part in the experiment and the partitions they hold.
    participants : list[int], optional
        Node ids that may take part (default: the whole federation); each round a
        ``fraction_train`` sample of them does.
    lr, epochs, batch_size, momentum, weight_decay, max_steps
        Local SGD of the stage, sent to the clients in every message: ``epochs``
        passes over the data the stage uses, capped at ``max_steps`` steps (0: no cap).
    fraction_train : float (default: 1.0)
        Fraction of the participants sampled each round (at least one; 1.0: all of them).
    rng : random.Random, optional
        Source of randomness for node sampling (seeded for reproducible runs).
    on_round : callable, optional
        Called with (round, model sent, replies without errors) after every round,
        e.g. to record per-client history (FedEraser).
    **kwargs
        Passed on to :class:`flwr.serverapp.strategy.FedAvg`. Client-side evaluation
        is off unless ``fraction_evaluate`` is given.

    Notes
    -----
    Replies must carry one ArrayRecord and one MetricRecord holding ``num-examples``
    (the aggregation weight: the size of the data the client used) and
    ``sample-gradients``, and may carry ``compute-seconds`` and ``distill-seconds``,
    summed over clients and rounds into :attr:`cost`. A client that fails is left out
    of its round's average with a warning; a round in which every client fails raises
    :class:`StageFailedError` with their reasons; a round in which every client reports
    weight 0 (no data, or nothing left to do) leaves the model unchanged. With fixed
    ``participants``, all of them in every round, the stage then ends: the remaining rounds would send the same
    model to the same clients, so they send nothing (``cost.rounds`` counts the rounds
    that ran).
    """

    stage_name = "train"
    message_type = protocol.TRAIN

    def __init__(  # pylint: disable=too-many-arguments
        self,
        federation: Federation,
        *,
        participants: list[int] | None = None,
        lr: float = 0.01,
        epochs: int = 1,
        batch_size: int = 64,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_steps: int = 0,
        fraction_train: float = 1.0,
        rng: random.Random | None = None,
        on_round: Callable[[int, ArrayRecord, list[Message]], None] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_available_nodes", 1)
        kwargs.setdefault("min_train_nodes", 1)
        super().__init__(fraction_train=fraction_train, **kwargs)
        self.federation = federation
        self.participants = participants
        self.stage_config: StageConfig = {
            protocol.LR: lr,
            protocol.EPOCHS: epochs,
            protocol.BATCH_SIZE: batch_size,
            protocol.MOMENTUM: momentum,
            protocol.WEIGHT_DECAY: weight_decay,
            protocol.MAX_STEPS: max_steps,
        }
        self.rng = rng or random.Random(0)
        self.on_round = on_round
        self.cost = StageCost()
        self.latest_metrics: dict[int, MetricRecord] = {}  # node -> metrics of its latest valid reply
        self.left_out: dict[str, str] = {}  # partition (as a JSON key) -> why it was left out of a round
        self.ended = False
        self.changed_model = False  # whether any round moved the global model
        self._sent: ArrayRecord | None = None
        self._addressed: list[int] = []  # the nodes this round's messages went to
        self._round_started = 0.0
        self._round = 0

    def run(
        self, grid: Grid, arrays: ArrayRecord, num_rounds: int, evaluate_fn: EvaluateFn
    ) -> tuple[ArrayRecord, StageCost]:
        """Flower's :meth:`start`; the model stays as it was if no round produced one."""
        result = self.start(grid=grid, initial_arrays=arrays, num_rounds=num_rounds, evaluate_fn=evaluate_fn)
        return (result.arrays if len(result.arrays) > 0 else arrays), self.cost

    def select_nodes(self, server_round: int, grid: Grid) -> list[int]:  # pylint: disable=unused-argument
        """Nodes that take part in this round: a ``fraction_train`` sample of the participants."""
        if self.fixed_nodes:
            return list(self.participants)
        pool = self.federation.node_ids if self.participants is None else list(self.participants)
        count = max(1, int(len(pool) * self.fraction_train))
        return sorted(self.rng.sample(pool, count))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current model and the stage settings to the selected nodes (none once the stage ended)."""
        if self.ended:
            log(INFO, "%s round %s: skipped, the stage ended", self.stage_name, server_round)
            return []
        self._round_started = time.perf_counter()
        self._round = server_round
        self.cost.rounds += 1
        node_ids = self.select_nodes(server_round, grid)
        log(INFO, "%s round %s: %s nodes", self.stage_name, server_round, len(node_ids))
        round_config = ConfigRecord({**dict(config), **self.stage_config, protocol.SERVER_ROUND: server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: round_config})
        self.cost.bytes_sent += arrays.count_bytes() * len(node_ids)
        self._sent, self._addressed = arrays, list(node_ids)
        messages = []
        for node in node_ids:
            extra = self.node_config(node)
            content = record if not extra else RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({**dict(round_config), **extra})})
            messages.append(Message(content, message_type=self.message_type, dst_node_id=node))
        return messages

    @property
    def fixed_nodes(self) -> bool:
        """Whether every round addresses the same nodes: all of the given participants."""
        return self.participants is not None and self.fraction_train >= 1.0

    def node_config(self, node_id: int) -> dict[str, bool | int | float | str]:  # pylint: disable=unused-argument
        """Settings of one node's message on top of the round's (none by default); called once
        per node and round, in the order the messages are built."""
        return {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the replies weighted by ``num-examples``, plus cost accounting."""
        if self.ended:
            return None, None
        valid = self._account(server_round, replies)
        with_data = [reply for reply in valid if int(reply_metrics(reply)[protocol.NUM_EXAMPLES])]
        if not with_data:
            self.ended = self.fixed_nodes
            log(INFO, "%s round %s: no client had anything to do; model unchanged%s", self.stage_name, server_round,
                "; the stage ends" if self.ended else "")
            self.finish_round()
            return None, None
        aggregated = super().aggregate_train(server_round, with_data)
        self.changed_model = True
        self.finish_round()
        return aggregated

    def _account(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Record the round's cost; return the replies without errors (raise if there are none)."""
        replies = list(replies)
        failed = [reply for reply in replies if reply.has_error()]
        valid = [reply for reply in replies if not reply.has_error()]
        if not valid:
            self.finish_round()
            raise StageFailedError(_failure_summary(self.stage_name, server_round, replies))
        if failed:
            log(WARNING, "%s round %s: %s of %s clients failed and are left out of the average: %s",
                self.stage_name, server_round, len(failed), len(replies), " | ".join(_reasons(failed)))
            for reply in failed:
                self._leave_out(reply.metadata.src_node_id, f"round {server_round}: {reply.error.reason.strip()}")
        silent = sorted(set(self._addressed) - {reply.metadata.src_node_id for reply in replies})
        if silent:  # timed out (the Grid returns what came back in time), or its node was lost
            log(WARNING, "%s round %s: %s of %s clients did not reply and are left out of the average",
                self.stage_name, server_round, len(silent), len(self._addressed))
            for node in silent:
                self._leave_out(node, f"round {server_round}: no reply")
        metrics = [reply_metrics(reply) for reply in valid]
        self.latest_metrics.update({reply.metadata.src_node_id: m for reply, m in zip(valid, metrics)})
        cost = self.cost
        cost.samples = max(cost.samples, sum(int(m[protocol.NUM_EXAMPLES]) for m in metrics))
        cost.sample_gradients += sum(int(m.get(protocol.SAMPLE_GRADIENTS, 0)) for m in metrics)
        cost.add_client_work(metrics)
        cost.distill_seconds += sum(float(m.get(protocol.DISTILL_SECONDS, 0.0)) for m in metrics)
        cost.bytes_received += sum(array_bytes(reply) for reply in valid)
        if self.on_round is not None and self._sent is not None:
            self.on_round(server_round, self._sent, valid)
        return valid

    def _leave_out(self, node: int, reason: str) -> None:
        """Record why a client's partition (the node id, for a node not in the federation) was left out."""
        partition = self.federation.partition_of(node) if node in self.federation.clients else node
        self.left_out.setdefault(str(partition), reason)

    def finish_round(self) -> None:
        """Add the round's wall time (since :meth:`configure_train`) to the stage's seconds."""
        seconds = time.perf_counter() - self._round_started
        self.cost.seconds += seconds
        log(INFO, "%s round %s took %.1f s", self.stage_name, self._round, seconds)


class TrainingStrategy(StageStrategy):
    """Federated training by local SGD on every client's data (FedAvg), forgotten classes
    (``exclude_classes``) left out."""

    stage_name = "train"
    message_type = protocol.TRAIN

    def __init__(self, federation: Federation, *, exclude_classes: list[int] | None = None, **kwargs) -> None:
        super().__init__(federation, **kwargs)
        if exclude_classes is not None:
            self.stage_config[protocol.EXCLUDE_CLASSES] = list(exclude_classes)


class RecoverStrategy(StageStrategy):
    """Recovery: SGD on the retain data (QuickDrop: synthetic images plus the real augmentation samples).

    Parameters
    ----------
    exclude_classes : list[int]
        Classes forgotten so far (left out of every client's recovery data).
    data : str
        ``synthetic`` (QuickDrop: store and augmentation) or ``original`` (the baselines).
    **kwargs
        As for :class:`StageStrategy` (``participants``: the
        clients not forgotten).
    """

    stage_name = "recover"
    message_type = protocol.message_type(protocol.TRAIN, protocol.RECOVER)

    def __init__(self, federation: Federation, *, exclude_classes: list[int], data: str = protocol.SYNTHETIC,
                 **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config.update(
            {protocol.EXCLUDE_CLASSES: list(exclude_classes), protocol.RELEARN_CLASSES: [], protocol.DATA: data}
        )


class RelearnStrategy(RecoverStrategy):
    """Relearning: SGD on the stage's data with the relearned classes or client back in.

    Parameters
    ----------
    relearn_classes : list[int]
        Class-level relearning: the classes coming back; each client repeats their
        samples so that each one it holds weighs half as much as the rest of its data
        (one class: about a third; they would otherwise be a tenth of it and come back
        slowly). Empty for a client.
    **kwargs
        As for :class:`RecoverStrategy` (``participants``: the clients not forgotten,
        a relearned client included).
    """

    stage_name = "relearn"
    message_type = protocol.message_type(protocol.TRAIN, protocol.RELEARN)

    def __init__(self, federation: Federation, *, relearn_classes: list[int], **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config[protocol.RELEARN_CLASSES] = list(relearn_classes)


def reply_metrics(reply: Message) -> MetricRecord:
    """The MetricRecord of a reply."""
    return next(iter(reply.content.metric_records.values()))


def reply_arrays(reply: Message) -> ArrayRecord:
    """The ArrayRecord of a reply."""
    return next(iter(reply.content.array_records.values()))


def _failure_summary(stage: str, server_round: int, replies: list[Message]) -> str:
    if not replies:
        return f"{stage} round {server_round}: no client replied"
    return f"{stage} round {server_round}: every client failed: " + " | ".join(_reasons(replies))


def _reasons(failed: list[Message]) -> list[str]:
    """The distinct error reasons of failed replies."""
    return sorted({reply.error.reason.strip() for reply in failed})
