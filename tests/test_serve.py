"""Requests that arrive between runs: `qd-app requests` queues them, `phase='serve'` serves them,
the ledger records every attempt; bad input changes nothing."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from test_apps import run_server, tiny_run_config
from test_unlearning_flow import STRONG_UNLEARNING, snapshot

from qd_app.cli import main as qd_app
from qd_app.errors import ConfigError, FederationError, LedgerError
from qd_app.server import experiment
from qd_app.server.ledger import Ledger


@pytest.fixture(scope="module")
def trained_once(tiny_mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    config = tiny_run_config(tiny_mnist_dir, root, **STRONG_UNLEARNING, **{"forget-class": ""})
    run_server({**config, "phase": "train"})
    return root, config


@pytest.fixture()
def trained(trained_once, tmp_path):
    """A copy of one trained experiment (the stores, only read while serving, are shared)."""
    root, config = trained_once
    shutil.copytree(root / "tiny", tmp_path / "tiny")
    return {**config, "output-dir": str(tmp_path), "store-dir": str(root / "stores")}


def submit(tmp_path, *args: str) -> int:
    return qd_app(["requests", "submit", "--output-dir", str(tmp_path), "--experiment", "tiny", *args])


def states(tmp_path) -> list[tuple[int, str, str]]:
    return [(r.id, r.request.label, r.state) for r in Ledger(tmp_path / "tiny").requests()]


def test_submitted_requests_are_served_in_order_by_a_later_run(trained, tmp_path, capsys):
    assert submit(tmp_path, "--forget-class", "3+5", "--requester", "alice") == 0
    assert submit(tmp_path, "--forget-client", "1") == 0
    assert "request 1: forget classes 3+5 (pending" in capsys.readouterr().out
    run_server({**trained, "phase": "serve"})
    assert states(tmp_path) == [(1, "classes 3+5", "served"), (2, "client 1", "served")]
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert [(r["id"], r["label"]) for r in results["requests"]] == [(1, "classes 3+5"), (2, "client 1")]
    served = Ledger(tmp_path / "tiny").get(1).served
    assert served["method"] == "quickdrop" and served["after-unlearn"]["forget-accuracy"] is not None
    assert served["model-after"] != Ledger(tmp_path / "tiny").get(1).attempts[0]["model-before"]
    assert qd_app(["requests", "list", "--output-dir", str(tmp_path), "--experiment", "tiny"]) == 0
    assert qd_app(["requests", "show", "2", "--output-dir", str(tmp_path), "--experiment", "tiny"]) == 0
    assert qd_app(["requests", "verify", "--output-dir", str(tmp_path), "--experiment", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "   1  served     unlearn classes 3+5" in out and '"requester": "qd-app requests submit"' in out
    assert "intact (2 requests" in out


def test_a_request_that_can_never_be_served_is_refused_and_the_next_one_served(trained, tmp_path):
    submit(tmp_path, "--forget-class", "3")
    submit(tmp_path, "--forget-class", "3")  # the same again: already forgotten by the time it comes up
    submit(tmp_path, "--forget-class", "4")
    run_server({**trained, "phase": "serve"})
    assert states(tmp_path) == [(1, "class 3", "served"), (2, "class 3", "refused"), (3, "class 4", "served")]
    assert "class 3 is already forgotten" in Ledger(tmp_path / "tiny").get(2).reason
    submit(tmp_path, "--forget-class", "5")
    run_server({**trained, "phase": "serve", "method": "s2u"})  # a method that cannot serve a class request
    assert "s2u unlearns clients only" in Ledger(tmp_path / "tiny").get(4).reason


def test_a_run_that_dies_while_serving_leaves_the_request_for_the_next_run(trained, tmp_path, monkeypatch):
    submit(tmp_path, "--forget-class", "3")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the server stops between the stages and saving the model

    monkeypatch.setattr(experiment.Experiment, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        run_server({**trained, "phase": "serve"})
    monkeypatch.undo()
    assert states(tmp_path) == [(1, "class 3", "running")]
    run_server({**trained, "phase": "serve"})
    request = Ledger(tmp_path / "tiny").get(1)
    assert request.state == "served" and [a["outcome"] for a in request.attempts] == ["interrupted", "served"]
    assert request.attempts[0]["model-before"] == request.attempts[1]["model-before"]  # from the same model


def test_serving_by_id_and_what_is_refused(trained, tmp_path):
    submit(tmp_path, "--forget-class", "3,4")
    run_server({**trained, "phase": "serve", "request-ids": "2"})
    assert states(tmp_path) == [(1, "class 3", "pending"), (2, "class 4", "served")]
    before = snapshot(tmp_path)
    with pytest.raises(LedgerError, match="request 2 \\(class 4\\) was already served at .*: it is not served again"):
        run_server({**trained, "phase": "serve", "request-ids": "1,2"})
    with pytest.raises(LedgerError, match="no request 9 in the ledger of tiny \\(ids 1-2\\)"):
        run_server({**trained, "phase": "serve", "request-ids": "9"})
    with pytest.raises(ConfigError, match="request-ids='2': is read by phase=serve only"):
        run_server({**trained, "phase": "unlearn", "request-ids": "2"})
    with pytest.raises(LedgerError, match="another run is using experiment tiny"):
        with Ledger(tmp_path / "tiny").serving():
            run_server({**trained, "phase": "serve"})
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "nope", "--forget-class", "3"], "unknown experiment 'nope': no trained model .* experiments "
                                                           "there: tiny"),
        (["--forget-class", "12"], "invalid option --forget-class='12': class ids must be in 0-9"),
        (["--forget-client", "7"], "invalid option --forget-client='7': client ids must be in 0-2"),
        (["--forget-class", "3+x"], "invalid option --forget-class='3\\+x': expected ids"),
        (["--experiment", "../x", "--forget-class", "3"], "invalid option --experiment='../x': must be a folder name"),
    ],
)
def test_bad_input_to_submit_says_what_was_wrong_and_changes_nothing(trained, tmp_path, capsys, args, message):
    before = snapshot(tmp_path)
    assert qd_app(["requests", "submit", "--output-dir", str(tmp_path), "--experiment", "tiny", *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("qd-app: error: ") and re.search(message, error), error
    assert snapshot(tmp_path) == before


def test_bad_input_to_the_other_actions(trained, tmp_path, capsys):
    submit(tmp_path, "--forget-class", "3")
    run_server({**trained, "phase": "serve"})
    before = snapshot(tmp_path)
    common = ["--output-dir", str(tmp_path), "--experiment", "tiny"]
    assert qd_app(["requests", "cancel", "1", *common]) == 2
    assert "request 1 (class 3) was already served at" in capsys.readouterr().err
    assert qd_app(["requests", "show", "5", *common]) == 2
    assert "no request 5 in the ledger of tiny (ids 1-1)" in capsys.readouterr().err
    assert qd_app(["requests", "list", "--output-dir", str(tmp_path), "--experiment", "other"]) == 2
    assert "unknown experiment 'other'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert qd_app(["requests", "list", "--output-dir", str(tmp_path / "file"), "--experiment", "tiny"]) == 2
    assert "invalid option --output-dir=" in (error := capsys.readouterr().err) and "is a file" in error
    assert snapshot(tmp_path) == {**before, "file": snapshot(tmp_path)["file"]}


def test_a_request_that_needs_a_missing_partition_waits_for_a_later_run(trained, tmp_path):
    submit(tmp_path, "--forget-class", "3")
    two_of_three = [{"partition-id": p, "num-partitions": 3} for p in (0, 2)]
    waiting = {**trained, "phase": "serve", "node-wait-seconds": 0.0}
    with pytest.raises(FederationError, match="partitions \\[1\\] are not connected .*node-wait-seconds=0"):
        run_server(waiting, node_configs=two_of_three)
    [request] = Ledger(tmp_path / "tiny").requests()
    assert request.state == "pending" and "partitions [1] are not connected" in request.attempts[0]["reason"]
    with pytest.raises(FederationError, match="partitions \\[1\\] did not connect"):
        run_server({**waiting, "phase": "train"}, node_configs=two_of_three)  # training needs every partition
    run_server(waiting)  # every node back
    assert states(tmp_path) == [(1, "class 3", "served")]
