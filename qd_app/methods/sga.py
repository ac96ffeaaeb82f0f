"""SGA-Or: QuickDrop's ascent and recovery on the clients' original data (the oracle for ascent)."""

from __future__ import annotations

from .. import protocol
from .quickdrop import GradientAscent


class SGA(GradientAscent):
    """Gradient ascent and recovery on the original data; plain FedAvg training."""

    name = "sga"
    title = "SGA-Or"
    data = protocol.ORIGINAL
