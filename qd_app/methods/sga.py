"""SGA-Or: QuickDrop's ascent and recovery on the clients' original data (the oracle for ascent)."""

from __future__ import annotations

from flwr.app import ArrayRecord

from .. import protocol
from ..request import UnlearningRequest
from ..server.method import MethodContext
from .quickdrop import GradientAscent


class SGA(GradientAscent):
    """Gradient ascent and recovery on the original data; plain FedAvg training.

    A client request ascends only until the client's data fits no better than the
    trained model's test images of the same classes: the fit of data it never saw.
    """

    name = "sga"
    title = "SGA-Or"
    data = protocol.ORIGINAL

    def target_losses(self, ctx: MethodContext, request: UnlearningRequest, arrays: ArrayRecord) -> list[float] | None:
        """For a client request, the model's per-class loss on the test images."""
        return ctx.evaluator.class_losses(arrays) if request.kind == "client" else None
