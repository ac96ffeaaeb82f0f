"""Retrain-Or: FedAvg from scratch without the forgotten data (the oracle every method is held to)."""

from __future__ import annotations

from flwr.app import ArrayRecord

from ..request import Forgotten, UnlearningRequest
from ..server.method import MethodContext, UnlearningMethod
from ..server.stages import StagePlan
from ..server.strategies import TrainingStrategy


class RetrainStrategy(TrainingStrategy):
    """FedAvg from a fresh model on the retain data (forgotten classes left out by every client)."""

    stage_name = "retrain"


class Retrain(UnlearningMethod):
    """Retrain-Or, with the training stage's own rounds, local epochs, batch size and client sampling."""

    name = "retrain"
    title = "Retrain-Or"
    retrain_strategy = RetrainStrategy

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        """One stage: training from the initial model, without what ``after`` forgets."""
        retained = ctx.training_participants(after)
        return [StagePlan(
            lambda: self.retrain_strategy(ctx.federation, participants=retained, exclude_classes=sorted(after.classes),
                                          fraction_train=ctx.config.fraction_train,
                                          rng=ctx.stage_rng("retrain", after),
                                          **ctx.training_settings()),
            ctx.config.num_server_rounds,
            start=lambda _: ctx.initial_model(),
        )]
