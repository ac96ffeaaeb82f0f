"""The record of served requests: append, replay, and the save-model-then-log repair.

Every request the server serves (unlearning and relearning) is appended to
``requests.jsonl`` beside the experiment's outputs, one JSON object per line, never
rewritten. Which classes and clients are forgotten now follows from replaying the
entries of the current model's lineage (one trained model and the requests served on
it). Serving a request saves the new model first, stamped with the entry it reflects,
and appends the entry second: a crash between the two leaves a model whose stamp is
ahead of the log, and :meth:`RequestLog.repair` appends the missing entry on the next run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from ..request import UnlearningRequest

LOG_FILE = "requests.jsonl"
UNLEARN, RELEARN = "unlearn", "relearn"
Entry = dict[str, Any]


class Forgotten(NamedTuple):
    """Classes and clients (partition ids) forgotten at some point of the experiment."""

    classes: frozenset[int]
    clients: frozenset[int]

    def after(self, action: str, request: UnlearningRequest) -> Forgotten:
        """The state once ``action`` (unlearn or relearn) has served ``request``."""
        classes, clients = set(self.classes), set(self.clients)
        changed = classes if request.kind == "class" else clients
        if action == UNLEARN:
            changed |= set(request.targets)
        else:
            changed -= set(request.targets)
        return Forgotten(frozenset(classes), frozenset(clients))

    def holds(self, request: UnlearningRequest) -> set[int]:
        """The targets of ``request`` that are forgotten now."""
        return set(request.targets) & (self.classes if request.kind == "class" else self.clients)


NOTHING_FORGOTTEN = Forgotten(frozenset(), frozenset())


def replay(entries: Iterable[Entry]) -> Forgotten:
    """What is forgotten after serving ``entries`` in order (each with action, kind, targets)."""
    state = NOTHING_FORGOTTEN
    for entry in entries:
        state = state.after(entry["action"], UnlearningRequest.from_dict(entry))
    return state


class RequestLog:
    """The append-only record of served requests of one experiment."""

    def __init__(self, output_path: Path) -> None:
        self.path = output_path / LOG_FILE

    def entries(self, lineage: str | None = None) -> list[Entry]:
        """Complete entries, oldest first, optionally only those about one trained model
        (``lineage``); a torn last line left by a crash is skipped."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return [e for e in entries if lineage is None or e.get("lineage") == lineage]

    def append_entry(self, entry: Entry) -> None:
        """Append one entry (with ``action``, ``kind``, ``targets``) as one write of one line, flushed to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, (json.dumps(entry, allow_nan=False) + "\n").encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def forgotten(self, lineage: str | None = None) -> Forgotten:
        """Classes and clients forgotten now: unlearned and not relearned since."""
        return replay(self.entries(lineage))

    def latest_in_force(self, lineage: str) -> UnlearningRequest | None:
        """The most recent unlearning request whose targets are all still forgotten."""
        entries = self.entries(lineage)
        forgotten = replay(entries)
        for entry in reversed(entries):
            request = UnlearningRequest.from_dict(entry)
            if entry["action"] == UNLEARN and forgotten.holds(request):
                return request
        return None

    def commit(self, entry: Entry, save_model: Callable[[int, Entry], object]) -> None:
        """Serve-time protocol: ``save_model(entries, entry)`` stamps the new model with the
        number of entries it reflects and the entry itself, then the entry is appended."""
        save_model(len(self.entries(entry["lineage"])) + 1, entry)
        self.append_entry(entry)

    def repair(self, lineage: str, model_entries: int, model_entry: Entry) -> None:
        """Append the entry a saved model reflects when a crash came before the log had it."""
        if len(self.entries(lineage)) < model_entries:
            self.append_entry(model_entry)
