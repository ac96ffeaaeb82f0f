"""Every unlearning method in process, from one trained model, and what each refuses."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_apps import run_server, tiny_run_config
from test_unlearning_flow import nodes_sent, snapshot

from qd_app.errors import RequestError
from qd_app.core.unlearning import LOSS_CAP, UNSEEN_QUANTILES

STAGES = {
    "quickdrop": ["unlearn", "recover"],
    "sga": ["unlearn", "recover"],
    "retrain": ["retrain"],
    "federaser": ["unlearn", "recover"],
    "fu-mp": ["unlearn", "recover"],
}


@pytest.fixture(scope="module")
def trained(tiny_mnist_dir, tmp_path_factory):
    """One trained experiment (stores and FedEraser history included) to copy per method."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_run_config(tiny_mnist_dir, root, **{"federaser-interval": 1, "num-server-rounds": 3,
                                                      "unlearn-lr": 0.5, "scale": 10})
    run_server(config)
    return root, config


def copy_of(trained, tmp_path: Path) -> dict:
    root, config = trained
    shutil.copytree(root / "tiny", tmp_path / "tiny")
    return {**config, "output-dir": str(tmp_path), "store-dir": str(root / "stores")}


@pytest.mark.parametrize("method", sorted(STAGES))
def test_every_class_level_method_serves_the_request_from_the_trained_model(trained, tmp_path, method):
    config = copy_of(trained, tmp_path)
    grid = run_server({**config, "phase": "unlearn", "method": method, "forget-class": "3"})
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert [s["name"] for s in results["stages"] if s["run"] == 1] == STAGES[method]
    [request] = results["requests"]
    assert request["label"] == "class 3" and request["total-seconds"] > 0
    assert all(s["bytes"] > 0 for s in results["stages"] if s["run"] == 1)
    final = request[f"after-{STAGES[method][-1]}"]
    assert final["forget-accuracy"] < request["before"]["forget-accuracy"]
    trained_messages = [m for m in grid.sent if m.metadata.message_type == "train"]
    if method == "retrain":
        assert len(trained_messages) == 3 * 3  # the training stage's rounds, every client
        assert {tuple(m.content["config"]["exclude-classes"]) for m in trained_messages} == {(3,)}
    if method == "federaser":
        assert len(trained_messages) == 3 * 3  # one calibration round per stored round
    if method == "fu-mp":
        assert any(m.metadata.message_type == "query.activation_stats" for m in grid.sent)
        classifier = torch.load(tmp_path / "tiny" / "model.pt")["state-dict"]["classifier.weight"]
        zero_features = (classifier.abs().sum(0) == 0).sum()
        assert zero_features == math.ceil(0.1 * classifier.shape[1])  # pruned, held at zero by recovery


def test_s2u_forgets_a_client_in_one_phase(trained, tmp_path):
    config = copy_of(trained, tmp_path)
    grid = run_server({**config, "phase": "unlearn", "method": "s2u", "forget-class": "", "forget-client": "1"})
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert [s["name"] for s in results["stages"] if s["run"] == 1] == ["s2u"]
    rounds = {m.content["config"]["server-round"] for m in grid.sent if m.metadata.message_type == "train"}
    assert rounds == {1, 2, 3}  # one unlearning round + recover-rounds


@pytest.mark.parametrize("method", ["sga", "quickdrop"])
def test_a_client_ascends_towards_the_fit_of_unseen_data_and_recovery_follows_only_a_change(trained, tmp_path, method):
    config = copy_of(trained, tmp_path)
    grid = run_server({**config, "phase": "unlearn", "method": method, "forget-class": "", "forget-client": "1"})
    [unlearn] = [m for m in grid.sent if m.metadata.message_type == "train.unlearn"]
    quantiles = list(unlearn.content["config"]["unseen-loss-quantiles"])
    assert len(quantiles) == 10 * UNSEEN_QUANTILES and all(0 <= loss <= LOSS_CAP for loss in quantiles)
    [reply] = [m for m in grid.replies if m.metadata.message_type == "train.unlearn"]
    stepped = reply.content["metrics"]["sample-gradients"] > 0
    recovered = any(m.metadata.message_type == "train.recover" for m in grid.sent)
    request = json.loads((tmp_path / "tiny" / "results.json").read_text())["requests"][-1]
    assert recovered == stepped and (request.get("skipped") == ["recover"]) == (not stepped)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "fu-mp", "forget-class": "", "forget-client": "1"}, "fu-mp unlearns classes only"),
        ({"method": "s2u", "forget-class": "3"}, "s2u unlearns clients only"),
    ],
)
def test_methods_refuse_requests_they_cannot_serve(trained, tmp_path, settings, message):
    config = copy_of(trained, tmp_path)
    with pytest.raises(RequestError, match=message):
        run_server({**config, "phase": "unlearn", **settings})


def test_fu_mp_cannot_relearn_and_federaser_needs_its_history(trained, tmp_path):
    config = copy_of(trained, tmp_path)
    run_server({**config, "phase": "unlearn", "method": "fu-mp", "forget-class": "3"})
    with pytest.raises(RequestError, match="fu-mp cannot relearn"):
        run_server({**config, "phase": "relearn", "method": "fu-mp", "forget-class": ""})
    stored = tmp_path / "tiny" / "federaser" / "round-2.pt"
    stored.write_bytes(stored.read_bytes()[:100])  # damaged: refused before any stage, nothing written
    before = snapshot(tmp_path)
    with pytest.raises(RequestError, match="history .*round-2.pt cannot be read .*train again with federaser-interval"):
        run_server({**config, "phase": "unlearn", "method": "federaser", "forget-class": "4"})
    assert snapshot(tmp_path) == before
    shutil.rmtree(tmp_path / "tiny" / "federaser")
    with pytest.raises(RequestError, match="federaser needs the client updates recorded during training"):
        run_server({**config, "phase": "unlearn", "method": "federaser", "forget-class": "4"})


def test_retrain_or_samples_the_clients_of_each_round_as_training_did(tiny_mnist_dir, tmp_path):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **{"fraction-train": 0.5, "num-server-rounds": 2})
    run_server(base, num_partitions=4)
    grid = run_server({**base, "phase": "unlearn", "method": "retrain", "forget-class": "3"}, num_partitions=4)
    rounds = nodes_sent(grid, "train")
    assert len(rounds) == 2 and all(len(partitions) == 2 for partitions in rounds)  # half of 4, as in training
