"""FedEraser (Liu et al. 2021): rebuild the model from the client updates recorded during training.

Training with ``federaser-interval`` = dt stores every client's update every dt rounds
(:class:`~qd_app.server.history.UpdateHistory`). Unlearning replays the stored rounds
from the first stored global model: the retained clients train ``ceil(r * E)`` local
epochs (``federaser-ratio`` r) from the rebuilt model, each new update takes the norm
of the client's stored update, and the rebuilt model moves by their weighted average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from ..core.aggregation import calibrated_update, weighted_sum
from ..core.models import StateDict
from ..errors import RequestError
from ..request import UNLEARN, Forgotten, UnlearningRequest
from ..server.federation import Federation
from ..server.history import UpdateHistory
from ..server.method import MethodContext, UnlearningMethod
from ..server.stages import StagePlan
from ..server.strategies import TrainingStrategy, reply_arrays


class FedEraserCalibration(TrainingStrategy):
    """FedEraser's unlearning: one calibration round per stored training round.

    Start it from the stored global model of the first stored round. In round j the
    retained clients train from the current rebuilt model (leaving out ``exclude-classes``);
    each client's new update is rescaled to the norm of its stored update of the j-th
    stored round, and the rebuilt model moves by their sample-weighted average.

    Parameters
    ----------
    history : UpdateHistory
        The updates recorded during training.
    **kwargs
        As for :class:`~qd_app.server.strategies.TrainingStrategy` (``participants``: the
        retained clients; ``epochs``: ``ceil(r * local-epochs)``; ``exclude_classes``).
    """

    stage_name = "unlearn"

    def __init__(self, federation: Federation, *, history: UpdateHistory, **kwargs) -> None:
        super().__init__(federation, **kwargs)
        self.history = history
        self.stored_rounds = history.rounds()
        self._current: StateDict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the rebuilt model to the retained clients."""
        self._current = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """Calibrate every reply against the stored update and apply their weighted average."""
        valid = self._account(server_round, replies)
        stored = self.history.load(self.stored_rounds[server_round - 1])
        updates, weights = [], []
        for reply in valid:
            partition = self.federation.partition_of(reply.metadata.src_node_id)
            if partition not in stored["updates"]:
                continue
            model = reply_arrays(reply).to_torch_state_dict()
            new = {key: model[key] - self._current[key] for key in model}
            updates.append(calibrated_update(new, stored["updates"][partition]))
            weights.append(float(stored["num-examples"][partition]))
        self.finish_round()
        if not updates:
            return None, None
        step = weighted_sum(updates, weights)
        rebuilt = {key: self._current[key] + step[key].to(self._current[key].dtype) for key in self._current}
        return ArrayRecord(rebuilt), None


class FedEraser(UnlearningMethod):
    """Calibration over the stored rounds, then recovery on the original data."""

    name = "federaser"
    title = "FedEraser"
    calibration_strategy = FedEraserCalibration

    def check(self, ctx: MethodContext, action: str, request: UnlearningRequest) -> None:
        """Unlearning needs the client updates recorded during training."""
        if action != UNLEARN:
            return
        if ctx.config.phase == "all" and not ctx.config.federaser_interval:
            raise RequestError("method federaser needs the client updates recorded during training: "
                               "set federaser-interval (e.g. 2)")
        history = ctx.history()
        if ctx.config.phase != "all" and not history.rounds():
            raise RequestError(f"method federaser needs the client updates recorded during training, and "
                               f"{history.folder} has none: train with federaser-interval (e.g. 2)")
        for stored in history.rounds():  # every file readable, before any stage runs
            history.load(stored)

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        """One calibration round per stored round from the first stored model, then recovery."""
        history = ctx.history()
        stored_rounds = history.rounds()
        retained = ctx.training_participants(after)
        epochs = math.ceil(ctx.config.federaser_ratio * ctx.config.local_epochs)
        calibration = StagePlan(
            lambda: self.calibration_strategy(
                ctx.federation, history=history, participants=retained, exclude_classes=sorted(after.classes),
                **{**ctx.training_settings(), "epochs": epochs}),
            len(stored_rounds),
            start=lambda _: ArrayRecord(history.load(stored_rounds[0])["global"]),
        )
        return [calibration, self.recovery(ctx, after)]
