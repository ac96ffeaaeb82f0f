"""QuickDrop end to end in process: train with stores, unlearn, recover, relearn, across runs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from test_apps import run_server, tiny_run_config

from qd_app.client import tasks as client_tasks
from qd_app.client.store import load_store, store_path
from qd_app.server import experiment
from qd_app.server import strategies
from qd_app.config import RunConfig
from qd_app.errors import ConfigError, RequestError, StageFailedError
from qd_app.core.models import ModelSpec, build_model
from qd_app.server.ledger import Ledger
from qd_app.server.results import model_digest

STRONG_UNLEARNING = {"unlearn-lr": 0.5, "unlearn-epochs": 5, "recover-epochs": 3, "relearn-epochs": 5,
                     "relearn-lr": 0.05, "scale": 10}


def results(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "tiny" / "results.json").read_text())


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def nodes_sent(grid, message_type: str) -> list[list[int]]:
    """Per round (group of consecutive messages), the partitions a message type went to."""
    rounds: dict[int, list[int]] = {}
    for message in grid.sent:
        if message.metadata.message_type == message_type:
            server_round = int(message.content["config"]["server-round"])
            rounds.setdefault(server_round, []).append(message.metadata.dst_node_id - 100)
    return [sorted(partitions) for _, partitions in sorted(rounds.items())]


def served(tmp_path: Path) -> list[tuple[str, list[int]]]:
    """The requests the ledger records as served, in order."""
    return [(r.action, list(r.targets)) for r in Ledger(tmp_path / "tiny").requests() if r.state == "served"]


def is_initial_model(config: dict, tmp_path: Path) -> bool:
    """Whether the experiment's current model is the one training started from (``seed=0``)."""
    initial = build_model(ModelSpec.from_config(RunConfig.from_run_config(config)), seed=0).state_dict()
    final = torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["state-dict"]
    return all(torch.equal(final[key], initial[key]) for key in initial)


def warnings_logged(monkeypatch, module) -> list[str]:
    """The warnings ``module`` logs from now on (Flower's logger does not propagate to caplog)."""
    warnings: list[str] = []

    def record(level, message, *args):
        if level == logging.WARNING:
            warnings.append(message % args)

    monkeypatch.setattr(module, "log", record)
    return warnings


def test_phase_all_trains_unlearns_recovers_and_relearns_a_class(tiny_mnist_dir, tmp_path):
    config = tiny_run_config(tiny_mnist_dir, tmp_path, phase="all", **{"forget-class": "3", "unlearn-rounds": 3},
                             **STRONG_UNLEARNING)
    grid = run_server(config)
    record = results(tmp_path)
    assert [s["name"] for s in record["stages"]] == ["train", "unlearn", "recover", "relearn"]
    unlearn_request, relearn_request = record["requests"]
    assert unlearn_request["label"] == "class 3" and relearn_request["action"] == "relearn"
    assert unlearn_request["after-unlearn"]["forget-accuracy"] < unlearn_request["before"]["forget-accuracy"]
    assert unlearn_request["total-seconds"] == pytest.approx(
        unlearn_request["seconds"]["unlearn"] + unlearn_request["seconds"]["recover"])
    assert unlearn_request["fraction-of-training"] == pytest.approx(
        unlearn_request["total-seconds"] / record["stages"][0]["seconds"])
    train = record["stages"][0]
    assert 0 < train["distill-seconds"] < train["compute-seconds"]  # clients' synthetic-image work, within their own
    assert train["client-peak-mb"] > 10 and train["server-peak-mb"] > 10  # processes' peak memory, in MB
    stores = record["stores"]  # each client's synthetic images, compared with its real ones at the end of training
    assert len(stores["synthetic-nearest"]) == 3 and all(d > 0 for d in stores["synthetic-nearest"])
    assert all(0 <= low <= mean for low, mean in zip(stores["synthetic-nearest-min"], stores["synthetic-nearest"]))
    assert all(isinstance(copies, int) for copies in stores["synthetic-copies"])
    assert all(s["compute-seconds"] > 0 and s["distill-seconds"] == 0 for s in record["stages"][1:])
    holders = [i for i, counts in enumerate(record["federation"]["class-counts"]) if counts[3]]
    # round 1 ascends; in round 2 every holder already forgets class 3 and replies with weight 0,
    # which ends the stage: round 3 of unlearn-rounds=3 sends nothing
    assert nodes_sent(grid, "train.unlearn") == [holders] * 2
    unlearn_stage = record["stages"][1]
    assert unlearn_stage["rounds"] == 2
    assert [r["stage"] for r in record["rounds"]].count("unlearn") == 3  # the plot still spans every round
    recover = [m for m in grid.sent if m.metadata.message_type == "train.recover"]
    assert {tuple(m.content["config"]["exclude-classes"]) for m in recover} == {(3,)}
    relearn = [m for m in grid.sent if m.metadata.message_type == "train.relearn"]
    assert {tuple(m.content["config"]["exclude-classes"]) for m in relearn} == {()}
    assert {tuple(m.content["config"]["relearn-classes"]) for m in relearn} == {(3,)}
    assert served(tmp_path) == [("unlearn", [3]), ("relearn", [3])]
    rounds = [r["round"] for r in record["rounds"]]
    assert rounds == list(range(len(rounds)))  # one numbering across all stages


def test_no_message_carries_images(tiny_mnist_dir, tmp_path):
    config = tiny_run_config(tiny_mnist_dir, tmp_path, phase="all", **{"forget-class": "3"}, **STRONG_UNLEARNING)
    grid = run_server(config)
    model = build_model(ModelSpec.from_config(RunConfig.from_run_config(config)))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert grid.replies
    for message in grid.sent + grid.replies:
        if message.has_error():
            continue
        content = message.content
        for array_record in content.array_records.values():
            assert {k: tuple(v.shape) for k, v in array_record.items()} == shapes  # model parameters only
        for record in list(content.metric_records.values()) + list(content.config_records.values()):
            for value in record.values():
                assert not isinstance(value, (bytes, list)) or len(value) <= 10  # scalars, per-class lists


def test_requests_arrive_in_later_runs_and_are_recorded(tiny_mnist_dir, tmp_path):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **STRONG_UNLEARNING)
    run_server({**base, "phase": "train"})
    run_server({**base, "phase": "unlearn", "forget-class": "3+5"})
    record = results(tmp_path)
    assert [run["phase"] for run in record["runs"]] == ["train", "unlearn"]
    assert [s["name"] for s in record["stages"]] == ["train", "unlearn", "recover"]
    assert [s["run"] for s in record["stages"]] == [0, 1, 1]
    assert record["requests"][0]["label"] == "classes 3+5"
    assert record["stages"][1]["first-round"] == record["stages"][0]["last-round"] + 1

    before = snapshot(tmp_path)
    with pytest.raises(RequestError, match="class 3 is already forgotten"):
        run_server({**base, "phase": "unlearn", "forget-class": "3"})
    assert snapshot(tmp_path) == before

    run_server({**base, "phase": "relearn", "forget-class": ""})  # the latest request in force
    assert served(tmp_path) == [("unlearn", [3, 5]), ("relearn", [3, 5])]
    lineage = torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["lineage"]
    assert Ledger(tmp_path / "tiny").forgotten(lineage) == (set(), set())
    with pytest.raises(RequestError, match="nothing is forgotten"):
        run_server({**base, "phase": "relearn", "forget-class": ""})


def test_client_level_unlearning_runs_only_on_the_client_and_recovers_on_the_others(tiny_mnist_dir, tmp_path):
    config = tiny_run_config(tiny_mnist_dir, tmp_path, phase="all", **{"forget-class": "", "forget-client": "1",
                                                                      "relearn-rounds": 0}, **STRONG_UNLEARNING)
    grid = run_server(config)
    assert nodes_sent(grid, "train.unlearn") == [[1]]
    assert nodes_sent(grid, "train.recover") == [[0, 2], [0, 2]]
    [request] = results(tmp_path)["requests"]
    assert request["kind"] == "client" and request["targets"] == [1]
    for key in ("before", "after-unlearn", "after-recover"):
        assert 0.0 <= request[key]["forget-accuracy"] <= 1.0 and 0.0 <= request[key]["retain-accuracy"] <= 1.0
    assert any(m.metadata.message_type == "evaluate" for m in grid.sent)


def test_bad_requests_are_refused_and_change_nothing(tiny_mnist_dir, tmp_path):
    base = tiny_run_config(tiny_mnist_dir, tmp_path)
    with pytest.raises(RequestError, match="client 7 does not exist \\(the federation has clients 0-2\\)"):
        run_server({**base, "phase": "all", "forget-class": "", "forget-client": "7"})
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "stores").exists()
    with pytest.raises(ConfigError, match="forget-class='12': class ids must be in 0-9"):
        run_server({**base, "phase": "unlearn", "forget-class": "12"})
    with pytest.raises(RequestError, match="no trained model at .*run phase=train"):
        run_server({**base, "phase": "unlearn", "forget-class": "3"})

    run_server({**base, "phase": "train"})
    before = snapshot(tmp_path)
    with pytest.raises(RequestError, match="written for another setup: scale 100 \\(this run: 50\\)"):
        run_server({**base, "phase": "unlearn", "forget-class": "3", "scale": 50})
    with pytest.raises(RequestError, match="trained with model"):
        run_server({**base, "phase": "unlearn", "forget-class": "3", "model-width": 16})
    assert snapshot(tmp_path) == before

    for store in (tmp_path / "stores" / "tiny").iterdir():
        store.unlink()
    with pytest.raises(RequestError, match="stores needed .* partition 0: missing"):
        run_server({**base, "phase": "unlearn", "forget-class": "3"})


def test_crash_between_saving_the_model_and_the_ledger_is_repaired(tiny_mnist_dir, tmp_path, monkeypatch):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **STRONG_UNLEARNING)
    run_server({**base, "phase": "train"})
    record = Ledger._record

    def crash_before_served(self, request_id, event, payload, allowed):
        if event == "served":
            raise OSError("killed")
        return record(self, request_id, event, payload, allowed)

    monkeypatch.setattr(Ledger, "_record", crash_before_served)
    with pytest.raises(OSError, match="killed"):
        run_server({**base, "phase": "unlearn", "forget-class": "4"})
    monkeypatch.undo()
    [request] = Ledger(tmp_path / "tiny").requests()
    assert request.state == "running" and served(tmp_path) == []
    checkpoint = torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)
    assert checkpoint["log-entries"] == 1  # the model already reflects the request
    with pytest.raises(RequestError, match="class 4 is already forgotten"):
        run_server({**base, "phase": "unlearn", "forget-class": "4"})
    [request] = Ledger(tmp_path / "tiny").requests()
    assert request.state == "served" and [a["outcome"] for a in request.attempts] == ["served"]


def test_a_client_failing_mid_request_is_recorded_and_the_request_can_be_served_again(
        tiny_mnist_dir, tmp_path, monkeypatch):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **STRONG_UNLEARNING)
    run_server({**base, "phase": "train"})
    before = snapshot(tmp_path)

    def power_cut(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(client_tasks, "gradient_ascent", power_cut)
    request = {**base, "phase": "unlearn", "forget-class": "", "forget-client": "1"}
    with pytest.raises(StageFailedError, match="unlearn round .*every client failed: .*power cut"):
        run_server(request)
    monkeypatch.undo()
    [pending] = Ledger(tmp_path / "tiny").requests()
    assert pending.state == "pending" and pending.attempts[0]["outcome"] == "failed"
    assert "power cut" in pending.attempts[0]["reason"]
    outside_ledger = {name: digest for name, digest in snapshot(tmp_path).items() if "ledger.sqlite" not in name}
    assert outside_ledger == before  # model, results and stores as they were

    run_server(request)  # the same request again: the pending one is served, not a second
    [request_served] = Ledger(tmp_path / "tiny").requests()
    assert request_served.state == "served" and [a["outcome"] for a in request_served.attempts] == ["failed", "served"]


def test_a_client_failing_in_one_round_is_left_out_with_a_warning(tiny_mnist_dir, tmp_path, monkeypatch):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **STRONG_UNLEARNING)
    run_server({**base, "phase": "train"})
    ascent, calls = client_tasks.gradient_ascent, []

    def first_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        return ascent(*args, **kwargs)

    monkeypatch.setattr(client_tasks, "gradient_ascent", first_call_fails)
    warnings = warnings_logged(monkeypatch, strategies)
    run_server({**base, "phase": "unlearn", "forget-class": "3"})
    assert len(warnings) == 1
    assert warnings[0].startswith("unlearn round ") and "1 of 3 clients failed" in warnings[0]
    assert "disk full" in warnings[0]
    assert served(tmp_path) == [("unlearn", [3])]


def test_a_request_for_every_class_at_once_is_answered_by_the_initial_model(tiny_mnist_dir, tmp_path, monkeypatch):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **STRONG_UNLEARNING)
    run_server({**base, "phase": "train"})
    warnings = warnings_logged(monkeypatch, experiment)
    grid = run_server({**base, "phase": "unlearn", "method": "sga", "forget-class": "0+1+2+3+4+5+6+7+8+9"})
    assert warnings == []
    assert not any(m.metadata.message_type.startswith("train.") for m in grid.sent)  # no stage reached a client
    assert results(tmp_path)["requests"][-1]["exact"] == experiment.NOTHING_LEFT
    assert is_initial_model(base, tmp_path)
    assert served(tmp_path)[-1] == ("unlearn", list(range(10)))


def test_forgetting_every_class_ends_at_the_initial_model_without_ascent(tiny_mnist_dir, tmp_path):
    light = {"num-server-rounds": 1, "unlearn-rounds": 1, "recover-rounds": 1, "relearn-rounds": 0}
    config = tiny_run_config(tiny_mnist_dir, tmp_path, phase="all", **{"forget-class": "all"}, **light)
    grid = run_server(config)
    record = results(tmp_path)
    *earlier, last = record["requests"]
    assert len(earlier) == 9 and not any("exact" in r for r in earlier)
    assert last["exact"] == experiment.NOTHING_LEFT and "after-reset" in last
    assert [s["name"] for s in record["stages"] if s["request"] == last["index"]] == ["reset"]
    ascended = {tuple(m.content["config"]["forget-classes"]) for m in grid.sent
                if m.metadata.message_type == "train.unlearn"}
    assert ascended == {tuple(r["targets"]) for r in earlier}  # no ascent on the last class
    assert is_initial_model(config, tmp_path)
    assert served(tmp_path)[-1] == ("unlearn", [last["targets"][0]])


def test_clients_that_never_trained_are_left_out_of_serving_and_their_requests_change_nothing(tiny_mnist_dir,
                                                                                               tmp_path):
    """With a fraction of the clients per round some never train, so they hold no store: a class
    request is served by those that trained, and forgetting a client that never trained leaves the
    model as it was (its data never reached it)."""
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **{"fraction-train": 0.25, "num-server-rounds": 1},
                           **STRONG_UNLEARNING)
    run_server(base, num_partitions=4)
    [trained] = torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["trained-partitions"]
    untrained = sorted(set(range(4)) - {trained})
    assert [p.name for p in (tmp_path / "stores" / "tiny").glob("*.qdstore")] == [f"partition-{trained}.qdstore"]

    grid = run_server({**base, "phase": "unlearn", "forget-class": "3"}, num_partitions=4)
    assert nodes_sent(grid, "train.unlearn")[0] == [trained]
    assert all(sent == [trained] for sent in nodes_sent(grid, "train.unlearn") + nodes_sent(grid, "train.recover"))
    assert served(tmp_path) == [("unlearn", [3])]

    before = model_digest(torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["state-dict"])
    grid = run_server({**base, "phase": "unlearn", "forget-class": "", "forget-client": str(untrained[0])}, num_partitions=4)
    assert not nodes_sent(grid, "train.unlearn") and not nodes_sent(grid, "train.recover")
    assert served(tmp_path) == [("unlearn", [3]), ("unlearn", [untrained[0]])]
    assert results(tmp_path)["requests"][-1]["skipped"] == ["recover"]
    assert model_digest(torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["state-dict"]) == before

    grid = run_server({**base, "phase": "relearn", "forget-class": "", "forget-client": str(untrained[0])},
                      num_partitions=4)
    assert not nodes_sent(grid, "train.relearn") and served(tmp_path)[-1] == ("relearn", [untrained[0]])
    assert model_digest(torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["state-dict"]) == before


def test_recovery_samples_a_fraction_of_the_clients_per_round_and_unlearning_asks_every_holder(tiny_mnist_dir,
                                                                                               tmp_path):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **{"fraction-train": 0.5, "num-server-rounds": 3},
                           **STRONG_UNLEARNING)
    run_server(base, num_partitions=4)
    trained = torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["trained-partitions"]
    counts = results(tmp_path)["federation"]["class-counts"]
    grid = run_server({**base, "phase": "unlearn", "forget-class": "3"}, num_partitions=4)
    assert nodes_sent(grid, "train.unlearn")[0] == [p for p in trained if counts[p][3]]
    recovery = nodes_sent(grid, "train.recover")
    assert recovery and all(len(sent) == max(1, len(trained) // 2) and set(sent) <= set(trained) for sent in recovery)


def test_with_sampled_clients_one_run_of_phase_all_gives_the_model_of_separate_runs(tiny_mnist_dir, tmp_path):
    """Which clients recovery samples depends on the seed and the request, not on what the run did before."""
    settings = {"fraction-train": 0.5, "num-server-rounds": 2, "relearn-rounds": 0, **STRONG_UNLEARNING}
    digests = []
    for folder, phases in ((tmp_path / "one", ["all"]), (tmp_path / "two", ["train", "unlearn"])):
        base = tiny_run_config(tiny_mnist_dir, folder, **{"forget-class": "3"}, **settings)
        for phase in phases:
            run_server({**base, "phase": phase}, num_partitions=4)
        digests.append(model_digest(torch.load(folder / "tiny" / "model.pt", weights_only=True)["state-dict"]))
    assert digests[0] == digests[1]


def test_a_client_first_sampled_in_a_later_round_starts_a_new_store_not_an_earlier_trainings(tiny_mnist_dir,
                                                                                             tmp_path):
    base = tiny_run_config(tiny_mnist_dir, tmp_path, **{"num-server-rounds": 2})
    run_server(base, num_partitions=4)  # every client distils 2 rounds into its store
    grid = run_server({**base, "fraction-train": 0.5, "num-server-rounds": 3}, num_partitions=4)
    rounds = nodes_sent(grid, "train.distill")
    for partition in torch.load(tmp_path / "tiny" / "model.pt", weights_only=True)["trained-partitions"]:
        _, metadata = load_store(store_path(tmp_path / "stores", "tiny", partition))
        assert metadata["rounds-distilled"] == sum(partition in sent for sent in rounds)  # none of the 2 before
