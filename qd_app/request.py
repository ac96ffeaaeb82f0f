"""Unlearning requests: what to forget, how the settings name it, and what is forgotten after serving some.

``forget-class`` and ``forget-client`` take a small grammar: ``"9"`` is one request,
``"3+5"`` forgets classes 3 and 5 together (parallel), ``"5,8,0"`` is a sequence of
requests served one after another (each with its recovery), and ``forget-class="all"``
forgets every class one after another in a random order drawn from ``seed`` (the
QuickDrop paper's Figure 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .errors import ConfigError

UNLEARN, RELEARN = "unlearn", "relearn"  # the two actions that serve a request


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


class Forgotten(NamedTuple):
    """Classes and clients (partition ids) forgotten at some point of an experiment."""

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
