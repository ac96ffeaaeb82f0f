"""The request ledger on its own: states, the order of events, the hash chain, repair and import."""

from __future__ import annotations

import json
import sqlite3

import pytest

from qd_app.errors import LedgerError
from qd_app.request import Forgotten, UnlearningRequest
from qd_app.server.ledger import Ledger

CLASS_3 = UnlearningRequest("class", (3,))
CLASSES_3_5 = UnlearningRequest("class", (3, 5))
CLIENT_1 = UnlearningRequest("client", (1,))


def serve(ledger: Ledger, request_id: int, lineage: str = "a") -> list[tuple[int, dict]]:
    """Serve a pending request the way a run does; returns what the model was stamped with."""
    saved = []
    ledger.start(request_id, {"run": 1, "method": "quickdrop", "model-before": "x"})
    ledger.commit(request_id, {"lineage": lineage, "model-after": "y"}, lambda count, stamp: saved.append((count, stamp)))
    return saved


def test_a_request_goes_from_pending_through_its_attempts_to_served(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.requests() == [] and not ledger.path.exists()  # reading creates nothing
    first = ledger.receive("unlearn", CLASS_3, "alice", "submit")
    second = ledger.receive("unlearn", CLIENT_1, "bob", "submit")
    assert (first, second) == (1, 2) and [r.state for r in ledger.requests()] == ["pending", "pending"]
    ledger.start(first, {"run": 1, "method": "quickdrop", "model-before": "x"})
    assert ledger.get(first).state == "running"
    ledger.fail(first, "node 3 is missing")
    assert ledger.get(first).state == "pending" and ledger.get(first).attempts[0]["reason"] == "node 3 is missing"
    assert serve(ledger, first) == [(1, {"lineage": "a", "model-after": "y", "id": 1})]
    request = ledger.get(first)
    assert request.state == "served" and [a["outcome"] for a in request.attempts] == ["failed", "served"]
    assert request.requester == "alice" and request.served["model-after"] == "y"
    ledger.cancel(second, "withdrawn by bob")
    assert ledger.get(second).state == "cancelled" and ledger.pending([]) == []


def test_a_request_is_never_served_twice_and_unknown_ids_are_named(tmp_path):
    ledger = Ledger(tmp_path)
    request_id = ledger.receive("unlearn", CLASS_3, "alice", "submit")
    serve(ledger, request_id)
    with pytest.raises(LedgerError, match="request 1 \\(class 3\\) was already served at .*: it is not served again"):
        ledger.start(request_id, {})
    with pytest.raises(LedgerError, match="was already served"):
        ledger.pending([1])
    with pytest.raises(LedgerError, match="was already served .* it is not cancelled"):
        ledger.cancel(request_id, "too late")
    with pytest.raises(LedgerError, match="no request 7 in the ledger of .* \\(ids 1-1\\)"):
        ledger.get(7)
    assert ledger.receive_once("unlearn", CLASS_3, "run config", "run-config") == 2  # served ones are not reused
    assert ledger.receive_once("unlearn", CLASS_3, "run config", "run-config") == 2  # pending ones are


def test_what_is_forgotten_follows_the_served_requests_of_one_lineage(tmp_path):
    ledger = Ledger(tmp_path)
    for action, request in (("unlearn", CLASSES_3_5), ("unlearn", CLIENT_1), ("relearn", CLIENT_1),
                            ("relearn", CLASS_3)):
        serve(ledger, ledger.receive(action, request, "x", "run-config"))
    serve(ledger, ledger.receive("unlearn", CLASS_3, "x", "run-config"), lineage="b")  # another trained model
    assert ledger.forgotten("a") == Forgotten(frozenset({5}), frozenset())
    assert ledger.latest_in_force("a") == CLASSES_3_5  # class 5 of it is still forgotten
    assert ledger.latest_in_force("b") == CLASS_3 and ledger.latest_in_force("c") is None


def test_a_model_saved_before_the_ledger_knew_is_repaired_once(tmp_path):
    ledger = Ledger(tmp_path)
    request_id = ledger.receive("unlearn", CLASS_3, "x", "run-config")
    ledger.start(request_id, {"run": 1})
    stamp = {"lineage": "a", "model-after": "y", "id": request_id}  # what the saved model says it reflects
    assert ledger.repair("a", 1, stamp) and ledger.get(request_id).state == "served"
    assert not ledger.repair("a", 1, stamp)  # a second look changes nothing
    assert len(ledger.served_in("a")) == 1


def test_the_hash_chain_shows_an_edited_or_removed_event(tmp_path):
    ledger = Ledger(tmp_path)
    serve(ledger, ledger.receive("unlearn", CLASS_3, "alice", "submit"))
    ledger.receive("unlearn", CLIENT_1, "bob", "submit")
    assert ledger.verify() == []
    with sqlite3.connect(ledger.path) as connection:
        connection.execute("UPDATE events SET payload = ? WHERE seq = 1",
                           (json.dumps({"action": "unlearn", "kind": "class", "targets": [4], "requester": "alice",
                                        "source": "submit"}, sort_keys=True),))
    assert [p.split(":")[0] for p in ledger.verify()] == ["event 1 (received of request 1)"]
    with sqlite3.connect(ledger.path) as connection:
        connection.execute("DELETE FROM events WHERE seq = 3")
    assert any("event 4: does not follow event 3" in p for p in ledger.verify())


def test_the_old_request_log_is_imported_once(tmp_path):
    entries = [{"action": "unlearn", "kind": "class", "targets": [3], "lineage": "a", "label": "class 3"},
               {"action": "relearn", "kind": "class", "targets": [3], "lineage": "a", "label": "class 3"}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"action": "unl')
    ledger = Ledger(tmp_path)
    ledger.import_old_log()
    assert [(r.action, r.state, r.source) for r in ledger.requests()] == [("unlearn", "served", "imported"),
                                                                         ("relearn", "served", "imported")]
    assert ledger.forgotten("a") == Forgotten(frozenset(), frozenset())
    assert not (tmp_path / "requests.jsonl").exists() and (tmp_path / "requests.jsonl.imported").exists()
    (tmp_path / "requests.jsonl").write_text(json.dumps(entries[0]) + "\n")  # put back by hand: not imported again
    ledger.import_old_log()
    assert len(ledger.requests()) == 2 and ledger.verify() == []


def test_a_second_run_on_the_same_experiment_is_refused(tmp_path):
    ledger = Ledger(tmp_path / "exp")
    with ledger.serving():
        with pytest.raises(LedgerError, match="another run is using experiment exp right now"):
            with Ledger(tmp_path / "exp").serving():
                pass
    with Ledger(tmp_path / "exp").serving():  # free again once the first is done
        pass
    assert not (tmp_path / "exp").exists()  # the lock sits beside the experiment's folder


@pytest.mark.parametrize("content", [b"not a database at all", b"SQLite format 3\x00" + b"\x07" * 4000])
def test_a_damaged_ledger_file_is_refused_with_what_to_do(tmp_path, content):
    (tmp_path / "ledger.sqlite").write_bytes(content)
    for read in (lambda ledger: ledger.requests(), lambda ledger: ledger.receive("unlearn", CLASS_3, "me", "submit")):
        with pytest.raises(LedgerError, match="ledger.sqlite is damaged .*restore it from a backup"):
            read(Ledger(tmp_path))
    assert (tmp_path / "ledger.sqlite").read_bytes() == content
