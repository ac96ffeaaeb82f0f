"""QuickDrop (the paper's Algorithm 2): distil during training, unlearn by ascent on the distilled data.

Training is FedAvg in which every client also distils its data into a per-class
synthetic store on its own disk (:class:`QuickDropTraining`). A request is served by
gradient ascent on the synthetic forget data (:class:`UnlearnStrategy`), then recovery
on the synthetic retain data and real augmentation samples; relearning trains on the
synthetic data with the relearned classes back in.
"""

from __future__ import annotations

from dataclasses import replace
from logging import INFO
from typing import Any, ClassVar

from flwr.app import ArrayRecord
from flwr.common import log

from .. import protocol
from ..request import Forgotten, UnlearningRequest
from ..server.federation import Federation
from ..server.method import MethodContext, UnlearningMethod
from ..server.stages import StagePlan
from ..server.strategies import StageStrategy


class QuickDropTraining(StageStrategy):
    """Federated training that distils every client's data into its synthetic store (QuickDrop, Alg. 2).

    The model trajectory is FedAvg's (the model steps on real gradients); each client
    additionally updates its per-class synthetic images by gradient matching at every
    local step, creates its store in the first round it takes part in and keeps it on its own disk.

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
        As for :class:`~qd_app.server.strategies.StageStrategy`.
    """

    stage_name = "train"
    message_type = protocol.message_type(protocol.TRAIN, protocol.DISTILL)

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
                protocol.NUM_ROUNDS: num_rounds,
                protocol.DISTILL_LR: distill_lr,
                protocol.DISTILL_MOMENTUM: distill_momentum,
                protocol.DISTILL_BATCH: distill_batch,
                protocol.FINETUNE_STEPS: finetune_steps,
            }
        )
        self.started: set[int] = set()  # nodes sent a round of this training

    def node_config(self, node_id: int) -> dict[str, bool | int | float | str]:
        """Whether the node's client starts a new store: in the first round it takes part in (with
        ``fraction-train`` < 1 not always round 1), not from a store an earlier training left."""
        new_store = node_id not in self.started
        self.started.add(node_id)
        return {protocol.NEW_STORE: new_store}


class UnlearnStrategy(StageStrategy):
    """Unlearning: the participants run gradient ascent on their forget data.

    Parameters
    ----------
    forget_classes : list[int], optional
        Class-level unlearning: the classes to forget (participants: the clients
        holding them). ``None``: client-level, the participant forgets its whole set.
    data : str
        ``synthetic`` (QuickDrop: the client's store) or ``original`` (SGA-Or: its data).
    unseen_loss_quantiles : list[float], optional
        Client-level only: quantiles of the model's capped loss on the test images of
        each class (:func:`~qd_app.core.unlearning.class_loss_quantiles`). The client then
        ascends only until its real data fits no better than that
        (:func:`~qd_app.core.unlearning.fits_like_unseen`), its epochs being the bound.
    **kwargs
        As for :class:`~qd_app.server.strategies.StageStrategy` (``participants`` is required).
    """

    stage_name = "unlearn"
    message_type = protocol.message_type(protocol.TRAIN, protocol.UNLEARN)

    def __init__(self, federation: Federation, *, forget_classes: list[int] | None = None,
                 data: str = protocol.SYNTHETIC, unseen_loss_quantiles: list[float] | None = None,
                 **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.stage_config.update(
            {protocol.FORGET_CLASSES: list(forget_classes or []), protocol.FORGET_EVERYTHING: forget_classes is None,
             protocol.DATA: data, protocol.UNSEEN_LOSS_QUANTILES: list(unseen_loss_quantiles or [])}
        )


class GradientAscent(UnlearningMethod):
    """Gradient ascent on the forget data, then recovery (QuickDrop and SGA-Or).

    A class request ascends on every holder of the class for up to ``unlearn-rounds``
    rounds (each client stops once its forget data is forgotten). A client request
    ascends one round on that client, for at most ``unlearn-client-epochs``, until the
    client's real data fits no better than the test images of its classes; the server
    sends their loss quantiles. Recovery repairs what the ascent changed, so it is
    skipped when no client took a step.
    """

    unlearn_strategy: ClassVar[type[StageStrategy]] = UnlearnStrategy

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        """Gradient ascent on the forget data, then recovery if the ascent changed the model."""
        class_level = request.kind == "class"
        epochs = None if class_level else ctx.config.unlearn_client_epochs
        participants = ctx.unlearn_participants(request, before)  # none: its data never reached the model
        if not participants:
            log(INFO, "No client that trained the model holds data of %s: nothing to unlearn", request.label)
        quantiles = None if class_level or not participants else ctx.evaluator.loss_quantiles(arrays)
        built: list[StageStrategy] = []

        def ascent_stage() -> StageStrategy:
            built.append(self.unlearn_strategy(
                ctx.federation, participants=participants,
                forget_classes=list(request.targets) if class_level else None, data=self.data,
                unseen_loss_quantiles=quantiles, **ctx.stage_settings("unlearn", epochs)))
            return built[-1]

        rounds = (ctx.config.unlearn_rounds if class_level else 1) if participants else 0
        ascent = StagePlan(ascent_stage, rounds)
        recovery = self.recovery(ctx, after)
        return [ascent, replace(recovery, needed=lambda: any(stage.changed_model for stage in built))]


class QuickDrop(GradientAscent):
    """QuickDrop: distillation during training; ascent and recovery on the clients' stores
    (a client request's goal is judged on the client's real data)."""

    name = "quickdrop"
    title = "QuickDrop"
    data = protocol.SYNTHETIC
    training_strategy: ClassVar[type[StageStrategy]] = QuickDropTraining

    def training_options(self, ctx: MethodContext) -> dict[str, Any]:
        """Local SGD and sampling, plus the distillation settings."""
        config = ctx.config
        return {**super().training_options(ctx), "num_rounds": config.num_server_rounds,
                "distill_lr": config.distill_lr, "distill_momentum": config.distill_momentum,
                "distill_batch": config.distill_batch, "finetune_steps": config.finetune_steps}
