"""Server strategies: FedAvg subclasses, one per stage of an experiment.

Every stage (training, unlearning, recovery, relearning and the baselines' stages)
is a :class:`StageStrategy`: FedAvg with a message type of its own, a hook
that picks the participating nodes, stage settings merged into every message, and
accounting of the stage's cost (wall seconds of the federated work, samples touched,
sample-gradient computations). Server-side evaluation between rounds is not part of a
stage's seconds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .errors import StageFailedError
from .federation import Federation

NUM_EXAMPLES = "num-examples"
SAMPLE_GRADIENTS = "sample-gradients"
COMPUTE_SECONDS = "compute-seconds"
DISTILL_SECONDS = "distill-seconds"


class StageStrategy(FedAvg):
    """FedAvg over chosen nodes of a :class:`Federation`, accounting for one stage.

    Parameters
    ----------
    federation : Federation
        The nodes taking part in the experiment and the partitions they hold.
    participants : list[int], optional
        Node ids that take part in every round; default: a ``fraction_train``
        sample of the whole federation each round.
    lr, epochs, batch_size, momentum, weight_decay, max_steps
        Local SGD of the stage, sent to the clients in every message: ``epochs``
        passes over the data the stage uses, capped at ``max_steps`` steps (0: no cap).
    fraction_train : float (default: 1.0)
        Fraction of the federation's nodes sampled each round (at least one), when
        no ``participants`` are given.
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
    ``sample-gradients`` (per-sample gradient computations it performed), and may carry
    ``compute-seconds`` (the client's local work) and ``distill-seconds`` (the part spent
    on synthetic images), summed over clients and rounds. A client that fails is left
    out of its round's average with a warning; a round in which every client fails
    raises :class:`StageFailedError` with their reasons; a round in which every client
    reports weight 0 (no data, or nothing left to do) leaves the model unchanged. With
    fixed ``participants`` the stage then ends: the remaining rounds would send the same
    model to the same clients, so they send nothing (:attr:`rounds` counts the rounds
    that ran).
    """

    stage_name = "train"
    message_type = MessageType.TRAIN

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
        self.stage_config: dict[str, int | float | str | bool | list[int]] = {
            "lr": lr,
            "epochs": epochs,
            "batch-size": batch_size,
            "momentum": momentum,
            "weight-decay": weight_decay,
            "max-steps": max_steps,
        }
        self.rng = rng or random.Random(0)
        self.on_round = on_round
        self._sent: ArrayRecord | None = None
        self.seconds = 0.0
        self.samples = 0
        self.sample_gradients = 0
        self.compute_seconds = 0.0
        self.distill_seconds = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_metrics: dict[int, MetricRecord] = {}
        self.rounds = 0
        self.ended = False
        self._round_started = 0.0
        self._round = 0

    def select_nodes(self, server_round: int, grid: Grid) -> list[int]:  # pylint: disable=unused-argument
        """Nodes that take part in this round: the participants, or a ``fraction_train`` sample."""
        if self.participants is not None:
            return list(self.participants)
        node_ids = self.federation.node_ids
        count = max(1, int(len(node_ids) * self.fraction_train))
        return sorted(self.rng.sample(node_ids, count))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current model and the stage settings to the selected nodes (none once the stage ended)."""
        if self.ended:
            log(INFO, "%s round %s: skipped, the stage ended", self.stage_name, server_round)
            return []
        self._round_started = time.perf_counter()
        self._round = server_round
        self.rounds += 1
        node_ids = self.select_nodes(server_round, grid)
        log(INFO, "%s round %s: %s nodes", self.stage_name, server_round, len(node_ids))
        round_config = ConfigRecord({**dict(config), **self.stage_config, "server-round": server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: round_config})
        self.bytes_sent += arrays.count_bytes() * len(node_ids)
        self._sent = arrays
        return self._construct_messages(record, node_ids, self.message_type)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the replies weighted by ``num-examples``, plus cost accounting."""
        if self.ended:
            return None, None
        valid = self._account(server_round, replies)
        with_data = [reply for reply in valid if int(_metrics(reply)[NUM_EXAMPLES])]
        if not with_data:
            self.ended = self.participants is not None
            log(INFO, "%s round %s: no client had anything to do; model unchanged%s", self.stage_name, server_round,
                "; the stage ends" if self.ended else "")
            self.finish_round()
            return None, None
        aggregated = super().aggregate_train(server_round, with_data)
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
        self.last_metrics = {reply.metadata.src_node_id: _metrics(reply) for reply in valid}
        metrics = list(self.last_metrics.values())
        self.samples = max(self.samples, sum(int(m[NUM_EXAMPLES]) for m in metrics))
        self.sample_gradients += sum(int(m.get(SAMPLE_GRADIENTS, 0)) for m in metrics)
        self.compute_seconds += sum(float(m.get(COMPUTE_SECONDS, 0.0)) for m in metrics)
        self.distill_seconds += sum(float(m.get(DISTILL_SECONDS, 0.0)) for m in metrics)
        self.bytes_received += sum(record.count_bytes() for r in valid for record in r.content.array_records.values())
        if self.on_round is not None and self._sent is not None:
            self.on_round(server_round, self._sent, valid)
        return valid

    def finish_round(self) -> None:
        """Add the round's wall time (since :meth:`configure_train`) to :attr:`seconds`."""
        seconds = time.perf_counter() - self._round_started
        self.seconds += seconds
        log(INFO, "%s round %s took %.1f s", self.stage_name, self._round, seconds)


class TrainingStrategy(StageStrategy):
    """Federated training by local SGD on every client's data (FedAvg)."""

    stage_name = "train"
    message_type = MessageType.TRAIN


class QuickDropTraining(StageStrategy):
    """Federated training that distils every client's data into its synthetic store (QuickDrop, Alg. 2).

    The model trajectory is FedAvg's (the model steps on real gradients); each client
    additionally updates its per-class synthetic images by gradient matching at every
    local step, creates its store in round 1 and keeps it on its own disk.

    Parameters
    ----------
    distill_lr, distill_momentum : float
        SGD on the synthetic images (paper: 0.1 and 0.5, one step per model step).
    distill_batch : int
        Synthetic images per class matched at each step.
    finetune_steps : int
        DC fine-tuning steps of the synthetic set after the last round (0: none).
    num_rounds : int
        Rounds of the stage (the clients fine-tune in the last one).
    **kwargs
        As for :class:`StageStrategy`.
    """

    stage_name = "train"
    message_type = f"{MessageType.TRAIN}.distill"

    def __init__(  # pylint: disable=too-many-arguments
        self,
        federation: Federation,
        *,
        num_rounds: int,
        distill_lr: float = 0.1,
        distill_momentum: float = 0.5,
        distill_batch: int = 4,
        finetune_steps: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config.update(
            {
                "num-rounds": num_rounds,
                "distill-lr": distill_lr,
                "distill-momentum": distill_momentum,
                "distill-batch": distill_batch,
                "finetune-steps": finetune_steps,
            }
        )


class UnlearnStrategy(StageStrategy):
    """Unlearning: the participants run gradient ascent on their synthetic forget data.

    Parameters
    ----------
    forget_classes : list[int], optional
        Class-level unlearning: the classes to forget (participants: the clients
        holding them). ``None``: client-level, the participant forgets its whole set.
    data : str
        ``synthetic`` (QuickDrop: the client's store) or ``original`` (SGA-Or: its data).
    target_losses : list[float], optional
        Client-level only: the mean (capped) loss on the test images of each class of
        the model being unlearned. A participant then ascends only until its data fits
        no better than that (:func:`~qd_app.unlearning.fits_like_unseen`) instead of
        running its epochs in full. Meaningful for real data only (SGA-Or): distilled
        images are not samples of the test distribution.
    **kwargs
        As for :class:`StageStrategy` (``participants`` is required).
    """

    stage_name = "unlearn"
    message_type = f"{MessageType.TRAIN}.unlearn"

    def __init__(self, federation: Federation, *, forget_classes: list[int] | None = None,
                 data: str = "synthetic", target_losses: list[float] | None = None, **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config.update(
            {"forget-classes": list(forget_classes or []), "forget-everything": forget_classes is None, "data": data,
             "target-losses": list(target_losses or [])}
        )


class RecoverStrategy(StageStrategy):
    """Recovery: SGD on the synthetic retain data plus the real augmentation samples.

    Parameters
    ----------
    exclude_classes : list[int]
        Classes forgotten so far (left out of every client's recovery data).
    data : str
        ``synthetic`` (QuickDrop: store and augmentation) or ``original`` (the baselines).
    **kwargs
        As for :class:`StageStrategy` (``participants``: the clients not forgotten).
    """

    stage_name = "recover"
    message_type = f"{MessageType.TRAIN}.recover"

    def __init__(self, federation: Federation, *, exclude_classes: list[int], data: str = "synthetic",
                 **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config.update({"exclude-classes": list(exclude_classes), "relearn-classes": [], "data": data})


class RelearnStrategy(RecoverStrategy):
    """Relearning: SGD on the synthetic data with the relearned classes or client back in.

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
    message_type = f"{MessageType.TRAIN}.relearn"

    def __init__(self, federation: Federation, *, relearn_classes: list[int], **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config["relearn-classes"] = list(relearn_classes)


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()))


def _failure_summary(stage: str, server_round: int, replies: list[Message]) -> str:
    if not replies:
        return f"{stage} round {server_round}: no client replied"
    return f"{stage} round {server_round}: every client failed: " + " | ".join(_reasons(replies))


def _reasons(failed: list[Message]) -> list[str]:
    """The distinct error reasons of failed replies."""
    return sorted({reply.error.reason.strip() for reply in failed})
