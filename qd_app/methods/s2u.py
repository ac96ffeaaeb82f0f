"""S2U: FedAvg rounds in which the forgotten clients' aggregation weight is scaled down (client-level only)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from .. import protocol
from ..core.aggregation import weighted_sum
from ..errors import RequestError
from ..request import Forgotten, UnlearningRequest
from ..server.federation import Federation
from ..server.method import MethodContext, UnlearningMethod
from ..server.stages import StagePlan
from ..server.strategies import TrainingStrategy, reply_arrays, reply_metrics


class S2UStrategy(TrainingStrategy):
    """FedAvg on the original data with the forgotten clients' weights scaled down.

    Parameters
    ----------
    forgotten_nodes : list[int]
        Nodes of the clients being forgotten; their aggregation weight (number of
        examples) is multiplied by ``scale``; FedAvg's normalisation scales the others up.
    scale : float
        Down-scaling factor of the forgotten clients' weights (``s2u-scale``, default 0.1).
    **kwargs
        As for :class:`~qd_app.server.strategies.TrainingStrategy` (``exclude_classes``:
        classes forgotten earlier).
    """

    stage_name = "s2u"

    def __init__(self, federation: Federation, *, forgotten_nodes: list[int], scale: float, **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.forgotten_nodes = set(forgotten_nodes)
        self.scale = scale

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Weighted average with the forgotten clients' weights scaled down."""
        models, weights = [], []
        for reply in self._account(server_round, replies):
            weight = float(reply_metrics(reply)[protocol.NUM_EXAMPLES])
            if reply.metadata.src_node_id in self.forgotten_nodes:
                weight *= self.scale
            models.append(reply_arrays(reply).to_torch_state_dict())
            weights.append(weight)
        self.finish_round()
        if not models or sum(weights) == 0:
            return None, None
        return ArrayRecord(weighted_sum(models, weights)), None


class S2U(UnlearningMethod):
    """``1 + recover-rounds`` S2U rounds (one unlearning round, as for any client request);
    unlearning and recovery are one phase."""

    name = "s2u"
    title = "S2U"
    s2u_strategy = S2UStrategy

    def check(self, ctx: MethodContext, action: str, request: UnlearningRequest) -> None:
        """S2U forgets clients only."""
        if request.kind == "class":
            raise RequestError("method s2u unlearns clients only: use forget-client (and forget-class='')")

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        """One stage over the retained clients and the forgotten ones."""
        forgotten_nodes = [ctx.federation.node_of(target) for target in request.targets]
        participants = sorted(set(ctx.training_participants(after)) | set(forgotten_nodes))
        return [StagePlan(
            lambda: self.s2u_strategy(ctx.federation, participants=participants, forgotten_nodes=forgotten_nodes,
                                      scale=ctx.config.s2u_scale, exclude_classes=sorted(after.classes),
                                      **ctx.training_settings()),
            1 + ctx.config.recover_rounds,
        )]
