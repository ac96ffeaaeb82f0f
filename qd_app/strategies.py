"""Server strategies: FedAvg subclasses, one per stage of an experiment.

Every stage (training, and in later steps unlearning, recovery, relearning and the
baselines) is a :class:`StageStrategy`: FedAvg with a message type of its own, a hook
that picks the participating nodes, stage settings merged into every message, and
accounting of the stage's cost (wall seconds of the federated work, samples touched,
sample-gradient computations). Server-side evaluation between rounds is not part of a
stage's seconds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .errors import StageFailedError
from .federation import Federation

NUM_EXAMPLES = "num-examples"
SAMPLE_GRADIENTS = "sample-gradients"


class StageStrategy(FedAvg):
    """FedAvg over the nodes of a :class:`Federation`, accounting for one stage.

    Parameters
    ----------
    federation : Federation
        The nodes taking part in the experiment and the partitions they hold.
    stage_config : Mapping[str, int | float | str | bool], optional
        Settings sent to the clients in every train message of this stage, on top of
        the ``config`` passed to :meth:`start`.
    fraction_train : float (default: 1.0)
        Fraction of the federation's nodes sampled each round (at least one).
    rng : random.Random, optional
        Source of randomness for node sampling (seeded for reproducible runs).
    **kwargs
        Passed on to :class:`flwr.serverapp.strategy.FedAvg`. Client-side evaluation
        is off unless ``fraction_evaluate`` is given.

    Notes
    -----
    Replies must carry one ArrayRecord and one MetricRecord holding ``num-examples``
    (the aggregation weight: the size of the data the client used) and
    ``sample-gradients`` (per-sample gradient computations it performed). A round in
    which every client fails raises :class:`StageFailedError` with their reasons.
    """

    stage_name = "train"
    message_type = MessageType.TRAIN

    def __init__(
        self,
        federation: Federation,
        *,
        stage_config: Mapping[str, int | float | str | bool] | None = None,
        fraction_train: float = 1.0,
        rng: random.Random | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_available_nodes", 1)
        kwargs.setdefault("min_train_nodes", 1)
        super().__init__(fraction_train=fraction_train, **kwargs)
        self.federation = federation
        self.stage_config = dict(stage_config or {})
        self.rng = rng or random.Random(0)
        self.seconds = 0.0
        self.samples = 0
        self.sample_gradients = 0
        self._round_started = 0.0

    def select_nodes(self, server_round: int, grid: Grid) -> list[int]:  # pylint: disable=unused-argument
        """Nodes that take part in this round (default: a ``fraction_train`` sample)."""
        node_ids = self.federation.node_ids
        count = max(1, int(len(node_ids) * self.fraction_train))
        return sorted(self.rng.sample(node_ids, count))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current model and the stage settings to the selected nodes."""
        self._round_started = time.perf_counter()
        node_ids = self.select_nodes(server_round, grid)
        log(INFO, "%s round %s: %s nodes", self.stage_name, server_round, len(node_ids))
        round_config = ConfigRecord({**dict(config), **self.stage_config, "server-round": server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: round_config})
        return self._construct_messages(record, node_ids, self.message_type)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the replies weighted by ``num-examples``, plus cost accounting."""
        replies = list(replies)
        valid = [reply for reply in replies if not reply.has_error()]
        if not valid:
            self.seconds += time.perf_counter() - self._round_started
            raise StageFailedError(_failure_summary(self.stage_name, server_round, replies))
        metrics = [next(iter(reply.content.metric_records.values())) for reply in valid]
        round_samples = sum(int(m[NUM_EXAMPLES]) for m in metrics)
        self.samples = max(self.samples, round_samples)
        self.sample_gradients += sum(int(m.get(SAMPLE_GRADIENTS, 0)) for m in metrics)
        if round_samples == 0:
            log(WARNING, "%s round %s: no client had data; model unchanged", self.stage_name, server_round)
            self.seconds += time.perf_counter() - self._round_started
            return None, None
        aggregated = super().aggregate_train(server_round, replies)
        self.seconds += time.perf_counter() - self._round_started
        return aggregated


class TrainingStrategy(StageStrategy):
    """Federated training of the model by local SGD on every client's data (FedAvg)."""

    stage_name = "train"
    message_type = MessageType.TRAIN


def _failure_summary(stage: str, server_round: int, replies: list[Message]) -> str:
    if not replies:
        return f"{stage} round {server_round}: no client replied"
    reasons = sorted({reply.error.reason.strip() for reply in replies})
    return f"{stage} round {server_round}: every client failed: " + " | ".join(reasons)
