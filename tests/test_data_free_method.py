"""Data-free unlearning as a method: the server erases a class alone, in process."""

from __future__ import annotations

import json

import pytest
from test_apps import run_server, tiny_run_config

from qd_app.errors import FederationError, RequestError
from qd_app.server.ledger import Ledger

DATA_FREE = {"ispf-epochs": 2, "ispf-cycles": 1, "ispf-student-steps": 3, "ispf-batch": 16,
             "ispf-generator-width": 4}


def test_ispf_serves_a_class_request_on_the_server_alone(tiny_mnist_dir, tmp_path):
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **{"model-norm": "batch"}))
    grid = run_server(tiny_run_config(tiny_mnist_dir, tmp_path, phase="unlearn", method="ispf",
                                      **{"forget-class": "3", "model-norm": "batch"}, **DATA_FREE))
    assert grid.sent == []  # not even the inventory query
    record = json.loads((tmp_path / "tiny" / "results.json").read_text())
    unlearn = record["stages"][-1]
    assert unlearn["name"] == "unlearn" and unlearn["bytes"] == 0 and unlearn["rounds"] == 1
    assert unlearn["details"]["method"] == "ispf" and unlearn["details"]["bn-statistics"] == 1.0
    assert [s["name"] for s in record["stages"]] == ["train", "unlearn"]  # ispf-recover-rounds=0: no recovery
    request = record["requests"][-1]
    assert request["label"] == "class 3" and request["after-unlearn"]["forget-accuracy"] is not None


@pytest.mark.parametrize("method", ["ispf", "gkt", "blockf"])
def test_data_free_methods_refuse_client_requests(tiny_mnist_dir, tmp_path, method):
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path))
    with pytest.raises(RequestError, match=f"method='{method}' erases classes from the model without data"):
        run_server(tiny_run_config(tiny_mnist_dir, tmp_path, phase="unlearn", method=method,
                                   **{"forget-class": "", "forget-client": "1"}))


def test_ispf_serves_while_clients_are_missing_where_quickdrop_waits(tiny_mnist_dir, tmp_path):
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path))
    two_of_three = [{"partition-id": p, "num-partitions": 3} for p in (0, 2)]
    request = {"phase": "unlearn", "forget-class": "3", "node-wait-seconds": 0.0}
    with pytest.raises(FederationError, match="partitions \\[1\\] are not connected"):
        run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **request), node_configs=two_of_three)
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path, method="ispf", **request, **DATA_FREE),
               node_configs=two_of_three)
    assert [(r.action, r.state) for r in Ledger(tmp_path / "tiny").requests()] == [("unlearn", "served")]


def test_ispf_serves_with_every_client_gone_and_keeps_the_training_record(tiny_mnist_dir, tmp_path):
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path))
    trained = json.loads((tmp_path / "tiny" / "results.json").read_text())
    grid = run_server(tiny_run_config(tiny_mnist_dir, tmp_path, phase="unlearn", method="ispf",
                                      **{"forget-class": "3+5", "node-wait-seconds": 0.0}, **DATA_FREE),
                      node_configs=[])
    assert grid.sent == []
    record = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert record["federation"] == trained["federation"] and record["stores"] == trained["stores"]
    assert record["requests"][-1]["label"] == "classes 3+5" and "exact" not in record["requests"][-1]

