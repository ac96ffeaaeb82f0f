"""Planning and checking requests as pure functions (no Grid, no Flower run)."""

from __future__ import annotations

import pytest

from qd_app.errors import RequestError
from qd_app.request import NOTHING_FORGOTTEN, Forgotten, UnlearningRequest
from qd_app.server import planner
from qd_app.server.federation import ClientInfo, Federation

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


def test_participants_can_be_limited_to_the_partitions_that_trained():
    fed, trained = federation(), {0, 2}  # client 1 never trained: it holds no store
    assert planner.holders(fed, (3,), NOTHING_FORGOTTEN, trained) == [102]
    assert planner.unlearn_participants(fed, CLIENT_1, NOTHING_FORGOTTEN, trained) == []
    assert planner.stage_participants(fed, "unlearn", CLASS_3, NOTHING_FORGOTTEN, trained) == [102, 100, 102]
    planner.check_stores(fed, set(planner.stage_participants(fed, "unlearn", CLASS_3, NOTHING_FORGOTTEN, trained)))
