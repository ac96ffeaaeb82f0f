"""HDUS (Ye et al. 2023): exact client unlearning in a decentralised federation; the server only relays.

There is no global model. Each client trains a main model of its own architecture
(``client-models``) and distils a seed model of a shared one (``hdus-seed-model``) on a
reference set (:mod:`qd_app.core.hdus`); the server forwards each seed model to the
sender's neighbours in ``hdus-topology`` and keeps none. Each client predicts with its main
model and the seed models it holds. Forgetting client j: every client holding j's seed
model (j's neighbours) deletes it, and j, if connected, its own state: no training, and
each ensemble is exactly one that never held j's seed model.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from .. import protocol
from ..core.hdus import neighbours
from ..errors import RequestError, StageFailedError
from ..request import NOTHING_FORGOTTEN, Forgotten, UnlearningRequest
from ..server.federation import Federation
from ..server.method import MethodContext, UnlearningMethod
from ..server.stages import EvaluateFn, RelayStage, StageCost, StagePlan


def hdus_settings(ctx: MethodContext) -> dict[str, Any]:
    """The ``hdus-*`` settings every HDUS message carries."""
    return {key: getattr(ctx.config, key.replace("-", "_")) for key in protocol.HDUS_SETTINGS}


class HdusStage(RelayStage):
    """A relay stage of HDUS: its message waves, then the clients' evaluation of their ensembles.

    Parameters
    ----------
    ctx : MethodContext
        The run's settings and federation.
    evaluated : list[int]
        The nodes whose ensembles are evaluated after the waves.
    """

    waves = 1

    def __init__(self, ctx: MethodContext, evaluated: list[int]) -> None:
        super().__init__()
        self.federation: Federation = ctx.federation
        self.settings = hdus_settings(ctx)
        self.evaluated = evaluated

    def message(self, node: int, action: str, server_round: int, extra: dict[str, Any] | None = None,
                **records: Any) -> Message:
        """One message of this stage: the HDUS settings (and ``extra`` config) and the given records."""
        config = ConfigRecord({**self.settings, protocol.SERVER_ROUND: server_round, **(extra or {})})
        return Message(RecordDict({protocol.CONFIG: config, **records}), dst_node_id=node,
                       message_type=protocol.message_type(protocol.TRAIN if action == protocol.SEED
                                                          else protocol.EVALUATE, action))

    def answered(self, replies: list[Message]) -> list[tuple[int, MetricRecord, Message]]:
        """Each reply's partition and metrics; a failed reply fails the stage (nothing is half-relayed)."""
        failed = [reply.error.reason for reply in replies if reply.has_error()]
        if failed:
            raise StageFailedError(f"{self.stage_name}: {len(failed)} client(s) failed: {failed[0]}")
        return [(self.federation.partition_of(reply.metadata.src_node_id), reply.content[protocol.METRICS], reply)
                for reply in replies]

    def run(self, grid: Grid, arrays: ArrayRecord, num_rounds: int,
            evaluate_fn: EvaluateFn) -> tuple[ArrayRecord, StageCost]:
        """The stage's waves (``num_rounds`` does not apply), then the ensembles' test accuracy."""
        arrays, cost = super().run(grid, arrays, self.waves, evaluate_fn)
        started = time.perf_counter()
        replies = grid.send_and_receive([self.message(node, protocol.ENSEMBLE, self.waves + 1)
                                         for node in self.evaluated])
        results = sorted((partition, metrics) for partition, metrics, _ in self.answered(list(replies)))
        cost.details["eval-seconds"] = time.perf_counter() - started
        if results:
            cost.evaluation = ensemble_summary(results, cost.details)
        return arrays, cost


def ensemble_summary(results: list[tuple[int, MetricRecord]], details: dict[str, Any]) -> tuple[float, tuple]:
    """Record each client's accuracy (main model alone, ensemble) in ``details``; return the
    mean over the clients of the ensemble's accuracy, overall and per class."""
    main = [float(m[protocol.MAIN_ACCURACY]) for _, m in results]
    ensemble = [float(m[protocol.ENSEMBLE_ACCURACY]) for _, m in results]
    details |= {"partitions": [p for p, _ in results], "main-accuracy": main, "ensemble-accuracy": ensemble,
                "mean-main-accuracy": sum(main) / len(main), "mean-ensemble-accuracy": sum(ensemble) / len(ensemble),
                "seeds-held": [list(m[protocol.SEEDS_HELD]) for _, m in results]}
    per_class = [[c / n if n else float("nan") for c, n in zip(m[protocol.CLASS_CORRECT], m[protocol.COUNTS])]
                 for _, m in results]
    return details["mean-ensemble-accuracy"], tuple(sum(column) / len(column) for column in zip(*per_class))


class SeedExchange(HdusStage):
    """Training: every client trains its main model and distils its seed model (wave 1); the
    server forwards each seed model to the sender's neighbours, who keep it (wave 2)."""

    stage_name = "train"
    waves = 2

    def __init__(self, ctx: MethodContext) -> None:
        self.nodes = ctx.training_participants(NOTHING_FORGOTTEN)  # clients with data
        super().__init__(ctx, self.nodes)
        config = ctx.config
        self.graph = neighbours(self.federation.num_partitions, config.hdus_topology, config.hdus_degree)
        self.seeds: dict[int, ArrayRecord] = {}
        self.latest_metrics: dict[int, MetricRecord] = {}

    def messages(self, server_round: int, grid: Grid) -> Iterable[Message]:
        if server_round == 1:
            return [self.message(node, protocol.SEED, server_round) for node in self.nodes]
        partition_of = self.federation.partition_of
        return [self.message(node, protocol.KEEP_SEEDS, server_round, None,
                             **{protocol.seed_record(j): self.seeds[j]
                                for j in self.graph[partition_of(node)] if j in self.seeds})
                for node in self.nodes]

    def receive(self, server_round: int, replies: list[Message]) -> None:
        for partition, metrics, reply in self.answered(replies):
            self.cost.sample_gradients += int(metrics[protocol.SAMPLE_GRADIENTS])
            if server_round == 1:
                self.cost.samples += int(metrics[protocol.NUM_EXAMPLES])
                self.seeds[partition] = reply.content[protocol.ARRAYS]
                self.latest_metrics[reply.metadata.src_node_id] = metrics
                self.cost.details.setdefault("main-models", {})[str(partition)] = str(
                    reply.content[protocol.DESCRIPTION][protocol.MAIN_MODEL])
            else:
                self.latest_metrics[reply.metadata.src_node_id][protocol.STORE_BYTES] = metrics[protocol.STORE_BYTES]
        if server_round == 2:
            self.seeds.clear()  # relayed: the server keeps no model


class SeedDeletion(HdusStage):
    """Unlearning clients: every connected client deletes the seed models of the forgotten
    clients it holds, and a forgotten client, if connected, its own state; nobody trains.
    Every client is asked (not only the neighbours of this run's ``hdus-topology``), so a
    copy is found wherever the training run's graph put it."""

    stage_name = "unlearn"

    def __init__(self, ctx: MethodContext, forgotten: list[int], after: Forgotten) -> None:
        super().__init__(ctx, ctx.training_participants(after))
        self.forgotten = forgotten
        self.nodes = list(self.federation.node_ids)

    def messages(self, server_round: int, grid: Grid) -> Iterable[Message]:
        if server_round > 1:
            return []
        return [self.message(node, protocol.DROP_SEEDS, server_round, {protocol.DROP_PARTITIONS: self.forgotten})
                for node in self.nodes]

    def receive(self, server_round: int, replies: list[Message]) -> None:
        deleted_at = []
        for partition, metrics, _ in self.answered(replies):
            still_held = set(metrics[protocol.SEEDS_HELD]) & set(self.forgotten)
            if still_held:
                raise StageFailedError(f"partition {partition} still holds the seed models of {sorted(still_held)}")
            if metrics[protocol.SEEDS_DROPPED]:
                deleted_at.append(partition)
        self.cost.details["deleted-at"] = sorted(deleted_at)


class HDUS(UnlearningMethod):
    """HDUS: one model per client, ensembles of neighbours' seed models, exact client unlearning."""

    name = "hdus"
    title = "HDUS"
    global_model = False

    def check(self, ctx: MethodContext, action: str, request: UnlearningRequest) -> None:
        if request.kind == "class":
            raise RequestError("method='hdus' forgets clients (their seed models are deleted); a class is spread "
                               "over every client's own model: set forget-class='' and forget-client, or use a "
                               "method with a global model (e.g. quickdrop) for class requests")
        if action != "unlearn":
            raise RequestError("method='hdus' does not relearn: a forgotten client rejoins by training again "
                               "(phase=train); with phase=all set relearn-rounds=0")

    def required_partitions(self, ctx: MethodContext, action: str, request: UnlearningRequest,
                            before: Forgotten) -> set[int]:
        """A client that left need not be connected: the clients holding its seed model delete it."""
        return super().required_partitions(ctx, action, request, before) - set(request.targets)

    def training(self, ctx: MethodContext) -> SeedExchange:
        return SeedExchange(ctx)

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        return [StagePlan(lambda: SeedDeletion(ctx, list(request.targets), after), 1)]
