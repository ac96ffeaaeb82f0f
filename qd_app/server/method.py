"""The method interface: what a method is asked for, and what it may use to answer.

A method is a recipe: for each request the stages that serve it, and what it refuses.
The methods in :mod:`qd_app.methods` (and a user's own) subclass :class:`UnlearningMethod`.
The orchestration (:mod:`qd_app.server.experiment`) asks the run's method for its
training stage, checks every request with :meth:`UnlearningMethod.check` before any
stage runs, then runs the :class:`~qd_app.server.stages.StagePlan` lists that
:meth:`~UnlearningMethod.unlearn` and :meth:`~UnlearningMethod.relearn` return.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from flwr.app import ArrayRecord

from .. import protocol
from ..config import RunConfig
from ..core.models import ModelSpec, build_model
from ..request import Forgotten, UnlearningRequest
from . import planner
from .evaluation import ServerEvaluator
from .federation import Federation
from .history import HISTORY_FOLDER, UpdateHistory
from .stages import Stage, StagePlan
from .strategies import RecoverStrategy, RelearnStrategy, StageStrategy, TrainingStrategy


@dataclass(frozen=True)
class MethodContext:
    """What a method's recipes may use: the settings, the federation, the model, the
    server's evaluator and the experiment's folder on the server. ``store_holders``: for a
    method that draws on the clients' stores, the partitions that trained the current model
    (only they hold one; the others' data never reached it), else None; participants come from them."""

    config: RunConfig
    federation: Federation
    model_spec: ModelSpec
    evaluator: ServerEvaluator
    output_path: Path
    rng: random.Random
    store_holders: frozenset[int] | None = None

    def initial_model(self) -> ArrayRecord:
        """The model training starts from (seeded by ``seed``): also Retrain-Or's start."""
        return ArrayRecord(build_model(self.model_spec, seed=self.config.seed).state_dict())

    def training_settings(self) -> dict[str, Any]:
        """Local SGD of the training stage, as strategy keyword arguments."""
        config = self.config
        return {"lr": config.lr, "epochs": config.local_epochs, "max_steps": config.local_steps,
                "batch_size": config.batch_size, "momentum": config.momentum, "weight_decay": config.weight_decay}

    def stage_settings(self, stage: str, epochs: int | None = None) -> dict[str, Any]:
        """Local SGD of an ``unlearn``, ``recover`` or ``relearn`` stage (``<stage>-lr``,
        ``<stage>-epochs`` unless ``epochs`` is given, the run's batch size and momentum)."""
        config = self.config
        return {"lr": getattr(config, f"{stage}_lr"), "epochs": epochs or getattr(config, f"{stage}_epochs"),
                "batch_size": config.batch_size, "momentum": config.momentum}

    def history(self) -> UpdateHistory:
        """The client updates recorded during training (``federaser-interval``)."""
        return UpdateHistory(self.output_path / HISTORY_FOLDER, self.config.federaser_interval)

    def stage_rng(self, stage: str, after: Forgotten) -> random.Random:
        """The client sampling of a ``stage`` that leaves ``after`` forgotten: seeded by ``seed``,
        the stage and the state, so a rerun, or the same request served in another run, samples alike."""
        return random.Random(f"{self.config.seed}/{stage}/{sorted(after.classes)}/{sorted(after.clients)}")

    def training_participants(self, state: Forgotten) -> list[int]:
        """Nodes of clients not forgotten that hold data of a class not forgotten."""
        return planner.training_participants(self.federation, state, self.store_holders)

    def unlearn_participants(self, request: UnlearningRequest, state: Forgotten) -> list[int]:
        """Nodes that unlearn ``request``: the holders of its classes, or its clients."""
        return planner.unlearn_participants(self.federation, request, state, self.store_holders)


class UnlearningMethod:
    """Base class of an unlearning method (subclass it; name yours by its import path).

    Set :attr:`name`, implement :meth:`unlearn`, and override :meth:`check` to refuse
    what the method cannot serve. The strategy classes its stages use are class
    attributes, so a subclass can swap one (``recover_strategy = MyRecovery``).

    Attributes
    ----------
    name : str
        The ``method`` setting that selects it.
    title : str
        Its name in tables (e.g. ``SGA-Or``).
    data : str
        What its client stages draw from: ``synthetic`` (the clients' stores, which
        must then be usable) or ``original`` (the clients' training data).
    global_model : bool
        Whether the method trains one global model, which the server evaluates and
        checkpoints. A decentralised method (HDUS) keeps one model per client instead: its
        stages report the clients' evaluation, and the server's checkpoint holds no parameters.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    data: ClassVar[str] = protocol.ORIGINAL
    global_model: ClassVar[bool] = True
    training_strategy: ClassVar[type[StageStrategy]] = TrainingStrategy
    recover_strategy: ClassVar[type[StageStrategy]] = RecoverStrategy
    relearn_strategy: ClassVar[type[StageStrategy]] = RelearnStrategy

    def check(self, ctx: MethodContext, action: str, request: UnlearningRequest) -> None:
        """Raise :class:`~qd_app.errors.RequestError` with the reason if this method cannot
        serve ``action`` (``unlearn`` or ``relearn``) of ``request``; by default it can."""

    def needs_clients(self, config: RunConfig, action: str) -> bool:  # pylint: disable=unused-argument
        """Whether serving ``action`` with these settings sends work to clients (then every
        partition not forgotten must be connected); a server-only answer does not, and a run
        that only unlearns with it contacts no client at all."""
        return True

    def required_partitions(self, ctx: MethodContext, action: str, request: UnlearningRequest,
                            before: Forgotten) -> set[int]:
        """The partitions that must be connected to serve ``action`` of ``request`` from ``before``
        (else it waits for a later run): every one not forgotten (of the :attr:`MethodContext.store_holders`,
        when set), none for a server-only answer."""
        if not self.needs_clients(ctx.config, action):
            return set()
        required = set(range(ctx.federation.num_partitions)) - before.clients
        return required if ctx.store_holders is None else required & ctx.store_holders

    def participants(self, ctx: MethodContext, action: str, request: UnlearningRequest,
                     state: Forgotten) -> list[int]:
        """The nodes that serving ``action`` of ``request`` from ``state`` sends work to (they hold
        usable stores for a ``synthetic`` method): the holders of the request's data and every
        client kept, none when :meth:`needs_clients` says so."""
        if not self.needs_clients(ctx.config, action):
            return []
        return planner.stage_participants(ctx.federation, action, request, state, ctx.store_holders)

    def training(self, ctx: MethodContext) -> Stage:
        """The training stage of a new trained model."""
        return self.training_strategy(ctx.federation, **self.training_options(ctx))

    def training_options(self, ctx: MethodContext) -> dict[str, Any]:
        """Keyword arguments of :attr:`training_strategy`: local SGD, client sampling and,
        with ``federaser-interval``, the recorder of client updates."""
        history = ctx.history()
        on_round = functools.partial(history.record_round, ctx.federation) if history.interval else None
        return {**ctx.training_settings(), "fraction_train": ctx.config.fraction_train, "rng": ctx.rng,
                "on_round": on_round}

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        """The stages that unlearn ``request`` from the model ``arrays``; ``before`` and
        ``after`` are what is forgotten before and after serving it."""
        raise NotImplementedError

    def relearn(self, ctx: MethodContext, request: UnlearningRequest, after: Forgotten) -> list[StagePlan]:
        """The stages that relearn ``request``: SGD with its data back in (the paper's Table 5);
        none for clients whose data never reached the model (nothing to bring back)."""
        participants = ctx.training_participants(after)
        relearned = list(request.targets) if request.kind == "class" else []
        never_trained = request.kind == "client" and not ctx.unlearn_participants(request, after)
        return [StagePlan(
            lambda: self.relearn_strategy(
                ctx.federation, participants=participants, exclude_classes=sorted(after.classes),
                relearn_classes=relearned, data=self.data, **ctx.stage_settings("relearn")),
            0 if never_trained else ctx.config.relearn_rounds,
        )]

    def recovery(self, ctx: MethodContext, after: Forgotten, **options: Any) -> StagePlan:
        """Recovery on the retain data of the clients not forgotten (none left: skipped), a
        ``fraction-train`` sample of them per round as in training (the paper's SVHN setting);
        ``options`` go to :attr:`recover_strategy` besides the stage settings."""
        retained = ctx.training_participants(after)
        return StagePlan(
            lambda: self.recover_strategy(ctx.federation, participants=retained, exclude_classes=sorted(after.classes),
                                          data=self.data, fraction_train=ctx.config.fraction_train,
                                          rng=ctx.stage_rng("recover", after),
                                          **ctx.stage_settings("recover"), **options),
            ctx.config.recover_rounds if retained else 0,
        )
