"""FU-MP (Wang et al. 2022): prune the units that respond to the forgotten classes (class-level only).

Clients report per-class activation sums of the prunable units (``prune-target``: the
classifier's input features, or every conv channel as in the paper); the server scores
the units by TF-IDF for the forget classes and zeroes the top ``prune-fraction`` of each
layer (:mod:`qd_app.core.pruning`); recovery holds them at zero. No relearning: pruning
is irreversible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from .. import protocol
from ..core.models import build_model
from ..core.pruning import PrunableLayer, prunable_layers, prune, tf_idf_scores
from ..errors import RequestError
from ..request import RELEARN, Forgotten, UnlearningRequest
from ..server.federation import Federation
from ..server.method import MethodContext, UnlearningMethod
from ..server.stages import StagePlan
from ..server.strategies import RecoverStrategy, StageStrategy


class FUMPPruning(StageStrategy):
    """FU-MP's unlearning: one round of activation statistics from the clients, then pruning.

    The clients (``query.activation_stats``) return per-class activation sums of every
    prunable unit of ``layers`` on their data; the server averages them, scores the units
    by TF-IDF for the forget classes and zeroes the top ``prune_fraction`` of each layer.
    The pruned units are kept in :attr:`pruned` for :class:`PrunedRecovery`.

    Parameters
    ----------
    layers : list[PrunableLayer]
        The units scored and pruned (:func:`~qd_app.core.pruning.prunable_layers`).
    prune_target : str
        Which units those are (``features`` or ``channels``), sent to the clients.
    forget_classes : list[int]
        The classes to forget.
    prune_fraction : float
        Fraction of each layer's units pruned.
    **kwargs
        As for :class:`~qd_app.server.strategies.StageStrategy`.
    """

    stage_name = "unlearn"
    message_type = protocol.message_type(protocol.QUERY, protocol.ACTIVATION_STATS)

    def __init__(self, federation: Federation, *, layers: list[PrunableLayer], prune_target: str,
                 forget_classes: list[int], prune_fraction: float, **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.layers = layers
        self.forget_classes = list(forget_classes)
        self.prune_fraction = prune_fraction
        self.stage_config[protocol.PRUNE_TARGET] = prune_target
        self.pruned: list[list[int]] = []  # filled in place when the stage runs (PrunedRecovery holds it)
        self._arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask the clients for their activation statistics under the current model."""
        self._arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Average the statistics, score the units and return the pruned model."""
        sums = None
        counts = None
        for reply in self._account(server_round, replies):
            stats = reply.content[protocol.STATISTICS]
            num_classes = len(stats[protocol.COUNTS])
            layer_sums = [torch.tensor(stats[protocol.layer_key(i)], dtype=torch.float64).view(num_classes, -1)
                          for i in range(len(self.layers))]
            reply_counts = torch.tensor(stats[protocol.COUNTS], dtype=torch.float64)
            sums = layer_sums if sums is None else [a + b for a, b in zip(sums, layer_sums)]
            counts = reply_counts if counts is None else counts + reply_counts
        self.pruned.clear()
        for layer_sum in sums:
            means = layer_sum / counts.clamp_min(1).unsqueeze(1)
            scores = tf_idf_scores(means, self.forget_classes)
            count = max(1, math.ceil(self.prune_fraction * len(scores)))
            self.pruned.append(torch.argsort(scores, descending=True)[:count].tolist())
        pruned = prune(self._arrays.to_torch_state_dict(), self.layers, self.pruned)
        self.finish_round()
        return ArrayRecord(pruned), None


class PrunedRecovery(RecoverStrategy):
    """Recovery that holds FU-MP's pruned units at zero after every aggregation."""

    def __init__(self, federation: Federation, *, layers: list[PrunableLayer], pruned: list[list[int]],
                 **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.layers, self.pruned = layers, pruned

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """FedAvg, then zero the pruned units again."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        return ArrayRecord(prune(arrays.to_torch_state_dict(), self.layers, self.pruned)), metrics


class FUMP(UnlearningMethod):
    """Pruning from the clients' activation statistics, then recovery with the pruned units held at zero."""

    name = "fu-mp"
    title = "FU-MP"
    pruning_strategy = FUMPPruning
    recover_strategy = PrunedRecovery

    def check(self, ctx: MethodContext, action: str, request: UnlearningRequest) -> None:
        """FU-MP forgets classes, and cannot relearn."""
        if request.kind == "client":
            raise RequestError("method fu-mp unlearns classes only (it prunes class-specific channels): "
                               "use forget-class, or another method for forget-client")
        if action == RELEARN:
            raise RequestError("method fu-mp cannot relearn: its pruning is irreversible "
                               "(set relearn-rounds=0 with phase=all)")

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        """Pruning (one round over every client not forgotten), then recovery holding the units at zero."""
        config = ctx.config
        pruning = self.pruning_strategy(
            ctx.federation, layers=prunable_layers(build_model(ctx.model_spec), config.prune_target),
            prune_target=config.prune_target,
            participants=ctx.federation.nodes_where(lambda c: c.partition_id not in before.clients),
            forget_classes=list(request.targets), prune_fraction=config.prune_fraction,
        )
        return [StagePlan(lambda: pruning, 1), self.recovery(ctx, after, layers=pruning.layers, pruned=pruning.pruned)]
