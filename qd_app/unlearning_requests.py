"""Unlearning requests: what to forget, how the settings name it, and the record of served requests.

``forget-class`` and ``forget-client`` take a small grammar: ``"9"`` is one request,
``"3+5"`` forgets classes 3 and 5 together (parallel), ``"5,8,0"`` is a sequence of
requests served one after another (each with its recovery), and ``forget-class="all"``
forgets every class one after another in a random order drawn from ``seed`` (the
QuickDrop paper's Figure 4).

The server keeps an append-only record (``requests.jsonl``) of every request it
served (unlearning and relearning); which classes and clients are forgotten right now
follows from replaying it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

LOG_FILE = "requests.jsonl"


@dataclass(frozen=True)
class UnlearningRequest:
    """Forget (or relearn) some classes, or some clients, together."""

    kind: str  # "class" or "client"
    targets: tuple[int, ...]

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``class 9``, ``classes 3+5``, ``client 2``."""
        plural = "es" if self.kind == "class" else "s"
        name = self.kind + (plural if len(self.targets) > 1 else "")
        return f"{name} {'+'.join(map(str, self.targets))}"

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> UnlearningRequest:
        """Inverse of :meth:`as_dict`."""
        return cls(entry["kind"], tuple(int(t) for t in entry["targets"]))


def parse_requests(
    key: str, text: str, kind: str, limit: int | None = None, seed: int = 0
) -> list[UnlearningRequest]:
    """Parse a ``forget-class`` / ``forget-client`` value (see the module docstring).

    ``limit`` bounds the ids (``0 .. limit-1``) where it is known.
    """
    text = text.strip()
    if not text:
        return []
    allowed = f"ids {'0-' + str(limit - 1) if limit else '>= 0'}, '+' for together, ',' for one after another"
    if text == "all" and kind == "class" and limit:
        order = np.random.default_rng(seed).permutation(limit)
        return [UnlearningRequest(kind, (int(cls),)) for cls in order]
    requests = []
    for part in text.split(","):
        try:
            targets = tuple(int(item) for item in part.split("+"))
        except ValueError:
            raise ConfigError(f"invalid setting {key}={text!r}: expected {allowed}" +
                              (", or 'all'" if kind == "class" else "")) from None
        if any(t < 0 or (limit is not None and t >= limit) for t in targets):
            raise ConfigError(f"invalid setting {key}={text!r}: {kind} ids must be in 0-{limit - 1}"
                              if limit else f"invalid setting {key}={text!r}: ids must be >= 0")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"invalid setting {key}={text!r}: a {kind} appears twice in one request")
        requests.append(UnlearningRequest(kind, tuple(sorted(targets))))
    return requests


class RequestLog:
    """The append-only record of served requests, one JSON object per line."""

    def __init__(self, output_path: Path) -> None:
        self.path = output_path / LOG_FILE

    def entries(self, lineage: str | None = None) -> list[dict[str, Any]]:
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

    def append_entry(self, entry: dict[str, Any]) -> None:
        """Append one entry (with ``action``, ``kind``, ``targets``) as one write of one line, flushed to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, (json.dumps(entry, allow_nan=False) + "\n").encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def forgotten(self, lineage: str | None = None) -> tuple[set[int], set[int]]:
        """Classes and clients forgotten now: unlearned and not relearned since."""
        forgotten: dict[str, set[int]] = {"class": set(), "client": set()}
        for entry in self.entries(lineage):
            targets = set(entry["targets"])
            if entry["action"] == "unlearn":
                forgotten[entry["kind"]] |= targets
            else:
                forgotten[entry["kind"]] -= targets
        return forgotten["class"], forgotten["client"]
