"""ISPF (Zhang et al. 2025) and the data-free baselines: the server erases classes alone.

No client is contacted: a generator synthesises images from the trained model (the
teacher) and a fresh student, initialised as training was (``seed``), learns the teacher's
outputs on them without the forgotten classes (:mod:`qd_app.core.data_free`). The student
becomes the global model. ``ispf-recover-rounds`` > 0 adds QuickDrop's recovery on the
clients' synthetic retain data, for a federation whose clients are reachable again.

Each variant is a method name: ``ispf`` (Inhibited Synthesis + PostFilter), ``ispf-is``,
``ispf-pf`` (one of the two), ``gkt`` and ``blockf`` (the paper's baselines).
"""

from __future__ import annotations

from dataclasses import replace
from logging import INFO
from typing import ClassVar

import torch
from flwr.app import ArrayRecord
from flwr.common import log

from ..config import RunConfig
from ..core.data import dataset_spec
from ..core.data_free import VARIANTS, DataFreeSettings, Generator, unlearn_data_free
from ..core.models import build_model
from ..core.training import resolve_device
from ..errors import RequestError
from ..request import UNLEARN, Forgotten, UnlearningRequest
from ..server.method import MethodContext
from ..server.stages import ServerStage, StagePlan
from .quickdrop import QuickDrop


def data_free_settings(ctx: MethodContext) -> DataFreeSettings:
    """The ``ispf-*`` settings; the BatchNorm statistics term on whenever the teacher has BatchNorm."""
    config = ctx.config
    return DataFreeSettings(
        epochs=config.ispf_epochs, cycles=config.ispf_cycles, generator_steps=config.ispf_generator_steps,
        student_steps=config.ispf_student_steps, batch_size=config.ispf_batch,
        generator_width=config.ispf_generator_width, generator_lr=config.ispf_generator_lr,
        student_lr=config.ispf_student_lr, tau=config.ispf_tau, temperature=config.ispf_temperature,
    )


class DataFreeStage(ServerStage):
    """One server-only round: generator training and distillation of a fresh student.

    Parameters
    ----------
    ctx : MethodContext
        The run's settings, model and dataset.
    forget_classes : list[int]
        Every class forgotten after the request (earlier ones too: the student is fresh).
    variant : str
        A key of :data:`~qd_app.core.data_free.VARIANTS`.
    """

    stage_name = "unlearn"

    def __init__(self, ctx: MethodContext, forget_classes: list[int], variant: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.forget_classes = forget_classes
        self.variant = variant

    def update(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The distilled student, from the teacher ``arrays``."""
        config, spec = self.ctx.config, dataset_spec(self.ctx.config.dataset)
        device = resolve_device(config.device)
        # channels-last: the same mathematics, faster convolutions on CPU (with BatchNorm especially)
        teacher = build_model(self.ctx.model_spec)
        teacher.load_state_dict(arrays.to_torch_state_dict())
        teacher = teacher.to(device, memory_format=torch.channels_last)
        student = build_model(self.ctx.model_spec, seed=config.seed).to(device, memory_format=torch.channels_last)
        settings = data_free_settings(self.ctx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            generator = Generator(settings.latent_dim, settings.generator_width, spec.channels, spec.image_size,
                                  spec.mean, spec.std).to(device, memory_format=torch.channels_last)

        def progress(epoch: int, status: dict[str, float]) -> None:
            if epoch == settings.epochs or epoch % max(settings.epochs // 5, 1) == 0:
                log(INFO, "%s epoch %s/%s: %.0f %% of generated samples kept", self.variant, epoch,
                    settings.epochs, 100 * status["kept-fraction"])

        report = unlearn_data_free(teacher, student, generator, self.forget_classes, VARIANTS[self.variant],
                                   settings, seed=config.seed + server_round, progress=progress)
        self.cost.samples = settings.batch_size
        self.cost.sample_gradients += int(report["student-steps"]) * settings.batch_size
        self.cost.details = {"method": self.variant, **report}
        if not report["bn-statistics"]:
            log(INFO, "%s: the model has no BatchNorm layer (model-norm=%r): the generator's BatchNorm "
                "statistics term is off", self.variant, config.model_norm)
        return ArrayRecord(student.to(memory_format=torch.contiguous_format).state_dict())


class DataFree(QuickDrop):
    """A data-free class unlearning method: one server-only stage, then optional recovery.

    Subclasses name a variant of :data:`~qd_app.core.data_free.VARIANTS`. Client requests
    are refused (the method knows nothing of a client's data). Training, recovery and
    relearning are QuickDrop's (the clients' synthetic stores), so a federation trained
    for one can be served by the other.
    """

    variant: ClassVar[str] = "ispf"

    def check(self, ctx: MethodContext, action: str, request: UnlearningRequest) -> None:
        """Refuse client requests."""
        if action == UNLEARN and request.kind == "client":
            raise RequestError(f"method={self.name!r} erases classes from the model without data and cannot "
                               f"forget a client's samples ({request.label}); use method='quickdrop' (or sga, "
                               "federaser, s2u, retrain) for forget-client")

    def needs_clients(self, config: RunConfig, action: str) -> bool:
        """Not for unlearning without recovery: the server works alone."""
        return action != UNLEARN or config.ispf_recover_rounds > 0

    def unlearn(self, ctx: MethodContext, request: UnlearningRequest, before: Forgotten, after: Forgotten,
                arrays: ArrayRecord) -> list[StagePlan]:
        """The data-free stage, then ``ispf-recover-rounds`` of recovery (0: none)."""
        distil = StagePlan(lambda: DataFreeStage(ctx, sorted(after.classes), self.variant), 1)
        recovery = self.recovery(ctx, after)
        return [distil, replace(recovery, rounds=ctx.config.ispf_recover_rounds if recovery.rounds else 0)]


class ISPF(DataFree):
    """ISPF: Inhibited Synthesis and the PostFilter."""

    name = "ispf"
    title = "ISPF"
    variant = "ispf"


class ISPFInhibitedSynthesis(DataFree):
    """ISPF's ablation: Inhibited Synthesis with GKT's sample gate, no PostFilter."""

    name = "ispf-is"
    title = "IS"
    variant = "ispf-is"


class ISPFPostFilter(DataFree):
    """ISPF's ablation: the PostFilter with the plain generator loss."""

    name = "ispf-pf"
    title = "PF"
    variant = "ispf-pf"


class GKT(DataFree):
    """Gated knowledge transfer: plain generator; samples whose teacher gives a forgotten
    class at least ``ispf-tau`` are dropped."""

    name = "gkt"
    title = "GKT"
    variant = "gkt"


class BlockF(DataFree):
    """BlockF: plain generator; samples the teacher classes as forgotten are dropped."""

    name = "blockf"
    title = "BlockF"
    variant = "blockf"
