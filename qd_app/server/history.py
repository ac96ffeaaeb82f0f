"""Per-client update history recorded during training (FedEraser's record), on the server's disk.

Switched on by ``federaser-interval`` whatever the run's method, so that one trained
model serves every method in the benchmark.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message

from .. import protocol
from ..atomic import atomic_write_bytes
from ..core.models import StateDict
from ..errors import RequestError
from .federation import Federation
from .strategies import reply_arrays, reply_metrics

HISTORY_FOLDER = "federaser"  # under the experiment's outputs


class UpdateHistory:
    """FedEraser's server-side record: every ``interval`` rounds of training (1, 1+dt, ...),
    the global model sent and each client's update, in ``folder/round-<k>.pt``."""

    def __init__(self, folder: Path, interval: int) -> None:
        self.folder = folder
        self.interval = interval

    def records(self, server_round: int) -> bool:
        """Whether a training round is one that is stored."""
        return self.interval > 0 and (server_round - 1) % self.interval == 0

    def save(self, server_round: int, global_model: StateDict, updates: dict[int, StateDict],
             num_examples: dict[int, int]) -> None:
        """Store one round atomically (updates keyed by partition id)."""
        buffer = io.BytesIO()
        torch.save({"global": global_model, "updates": updates, "num-examples": num_examples}, buffer)
        atomic_write_bytes(self.folder / f"round-{server_round}.pt", buffer.getvalue())

    def rounds(self) -> list[int]:
        """The stored rounds, in order."""
        return sorted(int(path.stem.split("-")[1]) for path in self.folder.glob("round-*.pt"))

    def load(self, server_round: int) -> dict:
        """One stored round: ``global``, ``updates`` and ``num-examples``.

        Raises
        ------
        RequestError
            If the file cannot be read as a stored round (damaged), saying what to do.
        """
        path = self.folder / f"round-{server_round}.pt"
        try:
            content = torch.load(path, weights_only=True)
            if not isinstance(content, dict) or {"global", "updates", "num-examples"} - set(content):
                raise ValueError("not a stored round")
        except Exception as exc:  # pylint: disable=broad-exception-caught  # any damage torch or pickle meets
            raise RequestError(f"FedEraser's history {path} cannot be read ({exc.__class__.__name__}: {exc}): "
                               "train again with federaser-interval set (phase=train), or restore the file") from exc
        return content

    def size_bytes(self) -> int:
        """Server storage the history takes."""
        return sum(path.stat().st_size for path in self.folder.glob("round-*.pt"))

    def record_round(self, federation: Federation, server_round: int, sent: ArrayRecord, replies: list[Message]) -> None:
        """A training stage's ``on_round`` hook: store every client's update of a recorded round."""
        if not self.records(server_round):
            return
        global_model = sent.to_torch_state_dict()
        updates, num_examples = {}, {}
        for reply in replies:
            partition = federation.partition_of(reply.metadata.src_node_id)
            model = reply_arrays(reply).to_torch_state_dict()
            updates[partition] = {key: model[key] - global_model[key] for key in model}
            num_examples[partition] = int(reply_metrics(reply)[protocol.NUM_EXAMPLES])
        self.save(server_round, global_model, updates, num_examples)

    def clear(self) -> None:
        """Delete the rounds of an earlier trained model."""
        for stale in self.folder.glob("round-*.pt"):
            stale.unlink()
