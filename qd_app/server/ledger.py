"""The request ledger: every request an experiment receives, and what became of it.

One SQLite database per experiment (``output-dir/<experiment>/ledger.sqlite``, WAL mode)
holds an append-only log of events: a request received, an attempt to serve it started,
failed or interrupted, the request served, refused or cancelled. Every event carries the
hash of the one before it, so that an edit anywhere breaks the chain (:meth:`Ledger.verify`).
A request's state is what its events say: ``pending`` until an attempt starts
(``running``), then ``served``, or ``pending`` again after a failed or interrupted attempt;
``refused`` when it can never be served, ``cancelled`` when withdrawn.

Serving saves the new model first, stamped with the served entry, and records the
``served`` event second: after a crash between the two, :meth:`Ledger.repair` records it
from the model's stamp. What is forgotten now follows from the served events of the
current model's lineage (one trained model and the requests served on it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..request import NOTHING_FORGOTTEN, UNLEARN, Forgotten, UnlearningRequest

LEDGER_FILE = "ledger.sqlite"
LOCK_SUFFIX = ".lock"  # output-dir/.<experiment>.lock
OLD_LOG_FILE = "requests.jsonl"  # the record before the ledger; imported once
GENESIS = "0" * 64
PENDING, RUNNING, SERVED, REFUSED, CANCELLED = "pending", "running", "served", "refused", "cancelled"
Entry = dict[str, Any]
SCHEMA = """CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, request INTEGER NOT NULL, event TEXT NOT NULL, at TEXT NOT NULL,
    payload TEXT NOT NULL, previous TEXT NOT NULL, hash TEXT NOT NULL)"""


@dataclass
class LedgerRequest:  # pylint: disable=too-many-instance-attributes
    """One request as its events leave it."""

    id: int
    action: str
    kind: str
    targets: tuple[int, ...]
    requester: str
    source: str
    received_at: str
    state: str = PENDING
    reason: str = ""
    attempts: list[Entry] = field(default_factory=list)
    served: Entry = field(default_factory=dict)  # the served entry: lineage, method, digests, F-Set / R-Set, seconds

    @property
    def request(self) -> UnlearningRequest:
        """What it asks to forget (or relearn)."""
        return UnlearningRequest(self.kind, self.targets)

    def as_dict(self) -> Entry:
        """JSON form (what ``qd-app requests show`` prints)."""
        return {"id": self.id, "action": self.action, "label": self.request.label, "kind": self.kind,
                "targets": list(self.targets), "requester": self.requester, "source": self.source,
                "received-at": self.received_at, "state": self.state, "reason": self.reason,
                "attempts": self.attempts, "served": self.served}


class Ledger:
    """The request ledger of one experiment (see the module docstring)."""

    def __init__(self, output_path: Path) -> None:
        self.output_path = output_path
        self.path = output_path / LEDGER_FILE

    # ------------------------------------------------------------------ storage
    @contextlib.contextmanager
    def _connection(self, write: bool) -> Iterator[sqlite3.Connection | None]:
        """A connection (``None`` when reading a ledger that does not exist yet); a write is one
        immediate transaction, so concurrent writers append one after another; a damaged file is refused."""
        if not write and not self.path.exists():
            yield None
            return
        self.output_path.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(SCHEMA)
            if not write:
                yield connection
                return
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:  # the file itself; OperationalError (locked, ...) is not
            if isinstance(exc, sqlite3.OperationalError):
                raise
            raise LedgerError(f"{self.path} is damaged ({exc}): restore it from a backup and check it "
                              "with qd-app requests verify") from exc
        finally:
            connection.close()

    def _events(self) -> list[sqlite3.Row]:
        with self._connection(write=False) as connection:
            return [] if connection is None else self._rows(connection)

    def _append(self, connection: sqlite3.Connection, request: int, event: str, payload: Entry) -> None:
        row = connection.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        seq, previous = (row[0] + 1, row[1]) if row else (1, GENESIS)
        at = _now()
        digest = _event_hash(previous, seq, request, event, at, payload)
        connection.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (seq, request, event, at, json.dumps(payload, sort_keys=True, allow_nan=False),
                            previous, digest))

    def _record(self, request_id: int, event: str, payload: Entry, allowed: tuple[str, ...]) -> None:
        """Append one event to a request, refused unless the request is in one of ``allowed`` states."""
        with self._connection(write=True) as connection:
            current = self._replay(self._rows(connection)).get(request_id)
            if current is None:
                raise LedgerError(f"request {request_id} is not in {self.path}")
            if current.state not in allowed:
                raise LedgerError(_transition_refusal(current, event))
            self._append(connection, request_id, event, payload)

    @staticmethod
    def _rows(connection: sqlite3.Connection) -> list[sqlite3.Row]:
        connection.row_factory = sqlite3.Row
        return connection.execute("SELECT * FROM events ORDER BY seq").fetchall()

    # ------------------------------------------------------------------ events
    def receive(self, action: str, request: UnlearningRequest, requester: str, source: str) -> int:
        """Record a new request (pending); returns its id."""
        with self._connection(write=True) as connection:
            self._import_old_log(connection)
            row = connection.execute("SELECT MAX(request) FROM events").fetchone()
            request_id = (row[0] or 0) + 1
            self._append(connection, request_id, "received", {
                "action": action, **request.as_dict(), "requester": requester, "source": source})
        return request_id

    def receive_once(self, action: str, request: UnlearningRequest, requester: str, source: str) -> int:
        """:meth:`receive`, unless a pending request asks exactly that already (its id is returned)."""
        for pending in self.requests():
            if pending.state == PENDING and pending.action == action and pending.request == request:
                return pending.id
        return self.receive(action, request, requester, source)

    def start(self, request_id: int, attempt: Entry) -> None:
        """An attempt to serve a pending request begins (``attempt``: run, method, model digest)."""
        self._record(request_id, "started", attempt, (PENDING,))

    def fail(self, request_id: int, reason: str) -> None:
        """The running attempt failed for a reason that may pass: the request is pending again."""
        self._record(request_id, "failed", {"reason": reason}, (RUNNING,))

    def interrupt(self, request_id: int) -> None:
        """A run died while serving the request (found by the next run): pending again."""
        self._record(request_id, "interrupted", {"reason": "the run serving it stopped before it was served"},
                     (RUNNING,))

    def refuse(self, request_id: int, reason: str) -> None:
        """The request can never be served as asked."""
        self._record(request_id, "refused", {"reason": reason}, (PENDING, RUNNING))

    def cancel(self, request_id: int, reason: str) -> None:
        """The requester withdraws a pending request."""
        self._record(request_id, "cancelled", {"reason": reason}, (PENDING,))

    def commit(self, request_id: int, entry: Entry, save_model: Callable[[int, Entry], object]) -> None:
        """Serve-time protocol: ``save_model(served, stamp)`` saves the new model stamped with the
        number of served requests it reflects in its lineage and the served entry; then the
        ``served`` event is recorded."""
        stamp = {**entry, "id": request_id}
        save_model(len(self.served_in(entry["lineage"])) + 1, stamp)
        self._record(request_id, "served", entry, (RUNNING,))

    def repair(self, lineage: str, model_served: int, stamp: Entry) -> bool:
        """Record the request a saved model reflects when a crash came before the ledger had it;
        returns whether it did."""
        if len(self.served_in(lineage)) >= model_served or "id" not in stamp:
            return False
        entry = {key: value for key, value in stamp.items() if key != "id"}
        self._record(int(stamp["id"]), "served", entry, (RUNNING, PENDING))
        return True

    # ------------------------------------------------------------------ reading
    def requests(self) -> list[LedgerRequest]:
        """Every request, by id."""
        with self._connection(write=False) as connection:
            if connection is None:
                return []
            return list(self._replay(self._rows(connection)).values())

    def get(self, request_id: int) -> LedgerRequest:
        """One request; :class:`LedgerError` names the ids there are when it is unknown."""
        found = {request.id: request for request in self.requests()}
        if request_id not in found:
            known = f"ids 1-{max(found)}" if found else "no requests yet"
            raise LedgerError(f"no request {request_id} in the ledger of {self.output_path.name} ({known})")
        return found[request_id]

    def pending(self, ids: list[int]) -> list[LedgerRequest]:
        """What a serving run takes: the requests ``ids`` names (each must be pending), or else
        every pending request, oldest first."""
        if not ids:
            return [request for request in self.requests() if request.state == PENDING]
        chosen = [self.get(request_id) for request_id in ids]
        for request in chosen:
            if request.state != PENDING:
                raise LedgerError(_transition_refusal(request, "started"))
        return chosen

    def served_in(self, lineage: str) -> list[LedgerRequest]:
        """The requests served on one trained model, in the order they were served."""
        served = [r for r in self.requests() if r.state == SERVED and r.served.get("lineage") == lineage]
        return sorted(served, key=lambda r: r.served["order"])

    def forgotten(self, lineage: str) -> Forgotten:
        """Classes and clients forgotten now: unlearned and not relearned since."""
        state = NOTHING_FORGOTTEN
        for request in self.served_in(lineage):
            state = state.after(request.action, request.request)
        return state

    def latest_in_force(self, lineage: str) -> UnlearningRequest | None:
        """The most recent served unlearning request with a target still forgotten."""
        forgotten = self.forgotten(lineage)
        for served in reversed(self.served_in(lineage)):
            if served.action == UNLEARN and forgotten.holds(served.request):
                return served.request
        return None

    def verify(self) -> list[str]:
        """Problems with the chain of events (none: every event is as recorded)."""
        problems, previous = [], GENESIS
        for row in self._events():
            payload = json.loads(row["payload"])
            if row["previous"] != previous:
                problems.append(f"event {row['seq']}: does not follow event {row['seq'] - 1} (a row was removed "
                                "or reordered)")
            if _event_hash(row["previous"], row["seq"], row["request"], row["event"], row["at"], payload) != row["hash"]:
                problems.append(f"event {row['seq']} ({row['event']} of request {row['request']}): its content was "
                                "changed after it was recorded")
            previous = row["hash"]
        return problems

    # ------------------------------------------------------------------ replay
    @staticmethod
    def _replay(rows: list[sqlite3.Row]) -> dict[int, LedgerRequest]:
        requests: dict[int, LedgerRequest] = {}
        for row in rows:
            payload, event = json.loads(row["payload"]), row["event"]
            if event == "imported":  # the old log was brought in: no request of its own
                continue
            if event == "received":
                requests[row["request"]] = LedgerRequest(
                    row["request"], payload["action"], payload["kind"], tuple(payload["targets"]),
                    payload["requester"], payload["source"], row["at"])
                continue
            request = requests[row["request"]]
            if event == "started":
                request.state = RUNNING
                request.attempts.append({**payload, "started-at": row["at"], "outcome": RUNNING})
            elif event in ("failed", "interrupted"):
                request.state = PENDING
                request.attempts[-1].update(outcome=event, reason=payload["reason"], **{"ended-at": row["at"]})
            elif event == SERVED:
                request.state, request.served = SERVED, {**payload, "served-at": row["at"], "order": row["seq"]}
                if request.attempts:
                    request.attempts[-1].update(outcome=SERVED, **{"ended-at": row["at"]})
            else:  # refused, cancelled
                request.state, request.reason = event, payload["reason"]
                if request.attempts and request.attempts[-1]["outcome"] == RUNNING:
                    request.attempts[-1].update(outcome=event, reason=payload["reason"], **{"ended-at": row["at"]})
        return requests

    # ------------------------------------------------------------------ the record before the ledger
    def _import_old_log(self, connection: sqlite3.Connection) -> None:
        """Bring the served requests of ``requests.jsonl`` in once (then the file is renamed)."""
        old = self.output_path / OLD_LOG_FILE
        if not old.exists():
            return
        if not connection.execute("SELECT 1 FROM events WHERE event = 'imported'").fetchone():
            for line in old.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                row = connection.execute("SELECT MAX(request) FROM events").fetchone()
                request_id = (row[0] or 0) + 1
                self._append(connection, request_id, "received", {
                    "action": entry["action"], "kind": entry["kind"], "targets": entry["targets"],
                    "requester": OLD_LOG_FILE, "source": "imported"})
                self._append(connection, request_id, SERVED, {key: entry[key] for key in entry
                                                              if key not in ("action", "kind", "targets")})
            self._append(connection, 0, "imported", {"file": OLD_LOG_FILE})
        old.replace(old.with_name(OLD_LOG_FILE + ".imported"))

    def import_old_log(self) -> None:
        """Import ``requests.jsonl`` now if it is there (every write does it first anyway)."""
        if (self.output_path / OLD_LOG_FILE).exists():
            with self._connection(write=True) as connection:
                self._import_old_log(connection)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Hold the experiment for one run; a second run on it at the same time is refused. The
        lock file sits beside the experiment's folder, so a run refused early leaves no folder."""
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_path.parent / f".{self.output_path.name}{LOCK_SUFFIX}", "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerError(f"another run is using experiment {self.output_path.name} right now: wait for it "
                                  "to finish, then run again (nothing was changed)") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _event_hash(previous: str, seq: int, request: int, event: str, at: str, payload: Entry) -> str:
    content = json.dumps([previous, seq, request, event, at, payload], sort_keys=True, allow_nan=False)
    return hashlib.sha256(content.encode()).hexdigest()


def _transition_refusal(current: LedgerRequest, event: str) -> str:
    what = {"served": "served", "cancelled": "cancelled", "refused": "refused", "started": "served"}.get(event, event)
    if current.state == SERVED:
        served_at = current.served.get("served-at", "")
        return (f"request {current.id} ({current.request.label}) was already served at {served_at}: "
                f"it is not {what} again")
    if current.state in (REFUSED, CANCELLED):
        return f"request {current.id} ({current.request.label}) was {current.state} ({current.reason}): it is not {what}"
    return f"request {current.id} ({current.request.label}) is {current.state}: it cannot be {what} now"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
