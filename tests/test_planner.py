"""Planning and checking requests, and the request record, as pure functions (no Grid, no Flower run)."""

from __future__ import annotations

import pytest

from qd_app.errors import RequestError
from qd_app.request import UnlearningRequest
from qd_app.server import planner
from qd_app.server.federation import ClientInfo, Federation
from qd_app.server.ledger import NOTHING_FORGOTTEN, Forgotten, RequestLog, replay

CLASS_3 = UnlearningRequest("class", (3,))
CLASSES_3_5 = UnlearningRequest("class", (3, 5))
CLIENT_1 = UnlearningRequest("client", (1,))


def federation() -> Federation:
    """Three clients: 0 holds classes 0-2, 1 holds 3-5, 2 holds 3 and 6-9; client 1's store is missing."""
    counts = [[5, 5, 5, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 5, 5, 5, 0, 0, 0, 0], [0, 0, 0, 5, 0, 0, 5, 5, 5, 5]]
    status = ["ok", "missing", "ok"]
    return Federation({100 + p: ClientInfo(100 + p, p, 3, tuple(counts[p]), status[p]) for p in range(3)})


def no_latest() -> None:
    raise AssertionError("the ledger is asked only for phase=relearn without a request")


def test_each_phase_plans_its_actions():
    assert planner.plan_requests("train", [CLASS_3], 2, no_latest) == []
    assert planner.plan_requests("all", [CLASS_3, CLIENT_1], 2, no_latest) == [
        ("unlearn", CLASS_3), ("unlearn", CLIENT_1), ("relearn", CLIENT_1)]
    assert planner.plan_requests("all", [CLASS_3], 0, no_latest) == [("unlearn", CLASS_3)]
    assert planner.plan_requests("unlearn", [CLASSES_3_5], 2, no_latest) == [("unlearn", CLASSES_3_5)]
    assert planner.plan_requests("relearn", [CLASS_3], 2, no_latest) == [("relearn", CLASS_3)]
    assert planner.plan_requests("relearn", [], 2, lambda: CLIENT_1) == [("relearn", CLIENT_1)]
    with pytest.raises(RequestError, match="phase=unlearn needs a request"):
        planner.plan_requests("unlearn", [], 2, no_latest)
    with pytest.raises(RequestError, match="nothing is forgotten"):
        planner.plan_requests("relearn", [], 2, lambda: None)
    with pytest.raises(RequestError, match="relearn-rounds=0 would relearn nothing"):
        planner.plan_requests("relearn", [CLASS_3], 0, no_latest)


def test_requests_are_checked_against_the_federation_and_what_is_forgotten():
    fed = federation()
    planner.check_client_ids([CLIENT_1], fed, "1")
    with pytest.raises(RequestError, match="client 7 does not exist \\(the federation has clients 0-2\\)"):
        planner.check_client_ids([UnlearningRequest("client", (7,))], fed, "7")
    planner.check_request("unlearn", CLASS_3, NOTHING_FORGOTTEN, fed)
    with pytest.raises(RequestError, match="class 3 is already forgotten"):
        planner.check_request("unlearn", CLASSES_3_5, Forgotten({3}, set()), fed)
    with pytest.raises(RequestError, match="no remaining client holds data of it"):
        planner.check_request("unlearn", UnlearningRequest("class", (1,)), Forgotten(set(), {0}), fed)
    with pytest.raises(RequestError, match="cannot relearn classes 3\\+5: class 5 is not forgotten"):
        planner.check_request("relearn", CLASSES_3_5, Forgotten({3}, set()), fed)
    planner.check_request("relearn", CLIENT_1, Forgotten(set(), {1}), fed)


def test_participants_follow_the_data_and_the_forgotten_state():
    fed = federation()
    assert planner.holders(fed, (3,), NOTHING_FORGOTTEN) == [101, 102]
    assert planner.holders(fed, (3,), Forgotten(set(), {1})) == [102]
    assert planner.training_participants(fed, Forgotten({0, 1, 2}, set())) == [101, 102]  # client 0 has nothing left
    assert planner.unlearn_participants(fed, CLIENT_1, NOTHING_FORGOTTEN) == [101]
    assert planner.stage_participants(fed, "unlearn", CLASS_3, NOTHING_FORGOTTEN) == [101, 102, 100, 101, 102]
    assert planner.stage_participants(fed, "relearn", CLIENT_1, Forgotten(set(), {1})) == [100, 101, 102]
    planner.check_stores(fed, {100, 102})
    with pytest.raises(RequestError, match="stores needed .* partition 1: missing"):
        planner.check_stores(fed, {100, 101})


def test_walking_a_plan_gives_each_step_the_state_it_starts_from():
    steps = planner.walk([("unlearn", CLASS_3), ("unlearn", CLIENT_1), ("relearn", CLASS_3)])
    assert [state for _, _, state in steps] == [(set(), set()), ({3}, set()), ({3}, {1})]


def test_the_record_replays_to_what_is_forgotten_and_finds_the_latest_request_in_force(tmp_path):
    log = RequestLog(tmp_path)
    served = [("unlearn", CLASSES_3_5), ("unlearn", CLIENT_1), ("relearn", CLIENT_1), ("relearn", CLASS_3)]
    for action, request in served:
        log.append_entry({"action": action, **request.as_dict(), "lineage": "a"})
    log.append_entry({"action": "unlearn", **CLASS_3.as_dict(), "lineage": "b"})  # another trained model
    assert log.forgotten("a") == Forgotten({5}, set()) == replay(log.entries("a"))
    assert log.latest_in_force("a") == CLASSES_3_5  # class 5 of it is still forgotten
    assert log.latest_in_force("b") == CLASS_3
    assert RequestLog(tmp_path / "none").latest_in_force("a") is None


def test_the_model_is_saved_before_the_record_and_a_crash_between_is_repaired(tmp_path):
    log, saved = RequestLog(tmp_path), []
    entry = {"action": "unlearn", **CLASS_3.as_dict(), "lineage": "a"}
    log.commit(entry, lambda count, logged: saved.append((count, logged, len(log.entries()))))
    assert saved == [(1, entry, 0)] and log.entries() == [entry]  # the model knew of the entry first
    second = {**entry, "targets": [4]}
    log.repair("a", 2, second)  # the saved model reflects a second entry the log never got
    log.repair("a", 2, second)  # repairing twice appends it once
    assert [e["targets"] for e in log.entries("a")] == [[3], [4]]
    with (tmp_path / "requests.jsonl").open("a") as file:
        file.write('{"action": "unl')  # a line torn by a crash
    assert len(log.entries()) == 2
