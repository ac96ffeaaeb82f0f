"""A real federation on this machine: `qd-app federation up` (SuperLink + SuperNodes, Flower's
deployment engine), `flwr run` against it, requests arriving between runs, a node lost in the
middle of a stage, the server process killed in the middle of one, a store damaged in the middle
of one, and a secure federation that refuses a node it does not know.

Every process is stopped by PID when the module is done, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from qd_app.cli import main as qd_app
from qd_app.deploy import security
from qd_app.deploy.federation import LocalFederation
from qd_app.deploy.processes import BIN, Process, free_ports, run_app, start
from qd_app.server.ledger import Ledger
from qd_app.server.results import load_checkpoint, model_digest

NODES = 3
SMALL = {"num-server-rounds": 2, "local-steps": 5, "model-width": 16, "unlearn-rounds": 1, "recover-rounds": 2,
         "relearn-rounds": 2}


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory):
    """A Flower home of the tests' own (the user's ~/.flwr is never touched)."""
    home = tmp_path_factory.mktemp("flwrhome")
    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    yield home
    if previous is None:
        del os.environ["FLWR_HOME"]
    else:
        os.environ["FLWR_HOME"] = previous


@pytest.fixture(scope="module")
def federation(flwr_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("federation")
    assert qd_app(["federation", "up", "--nodes", str(NODES), "--dir", str(folder)]) == 0
    recorded = LocalFederation(folder)
    yield folder
    state = recorded.load()
    processes = [Process(**p) for p in [state.superlink, *(n.process for n in state.nodes)] if p]
    qd_app(["federation", "down", "--dir", str(folder)])
    assert not any(process.alive() for process in processes)


def flwr_run(folder: Path, flwr_home: Path, connection: str = "qd-local", **settings) -> dict:
    """``flwr run`` on the federation with the small settings and ``settings`` (underscores for dashes)."""
    merged = {"output-dir": str(folder / "outputs"), "data-dir": str(folder / "data"), "experiment": "e2e", **SMALL,
              **{key.replace("_", "-"): value for key, value in settings.items()}}
    text = " ".join(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in merged.items())
    run, log = run_app(connection, text, flwr_home, timeout=900)
    run["log"] = log
    return run


def requests(folder: Path, *args: str) -> int:
    return qd_app(["requests", *args, "--output-dir", str(folder / "outputs"), "--experiment", "e2e"])


def test_train_restart_nodes_submit_serve_and_relearn_in_separate_runs(federation, flwr_home, capsys):
    trained = flwr_run(federation, flwr_home, phase="train")
    assert trained["status"] == "finished:completed", trained["log"][-3000:]
    state = LocalFederation(federation).load()
    before = [node.process["pid"] for node in state.nodes]
    assert qd_app(["federation", "down", "--dir", str(federation), *sum((["--node", str(p)] for p in range(NODES)),
                                                                         [])]) == 0
    assert qd_app(["federation", "status", "--dir", str(federation)]) == 0
    status = capsys.readouterr().out.splitlines()[1:]  # after the line that says how many were stopped
    assert [line.split()[-1] for line in status] == ["running"] + ["stopped"] * NODES
    assert qd_app(["federation", "up", "--nodes", str(NODES), "--dir", str(federation)]) == 0
    after = [node.process["pid"] for node in LocalFederation(federation).load().nodes]
    assert not set(before) & set(after)  # new SuperNode processes, the same stores on their disks

    assert requests(federation, "submit", "--forget-class", "3", "--requester", "ticket 7") == 0
    served = flwr_run(federation, flwr_home, phase="serve")
    assert served["status"] == "finished:completed", served["log"][-3000:]
    relearned = flwr_run(federation, flwr_home, phase="relearn", forget_class="")
    assert relearned["status"] == "finished:completed", relearned["log"][-3000:]

    ledger = Ledger(federation / "outputs" / "e2e")
    assert [(r.id, r.action, r.request.label, r.state, r.requester) for r in ledger.requests()] == [
        (1, "unlearn", "class 3", "served", "ticket 7"), (2, "relearn", "class 3", "served", "run config")]
    first = ledger.get(1)
    assert first.served["after-recover"]["forget-accuracy"] <= 0.1 and first.served["model-after"]
    assert ledger.verify() == []
    assert requests(federation, "list") == 0 and "ticket 7" in capsys.readouterr().out


@contextmanager
def when_recovery_starts(federation: Path, node: int, fault: Callable[[], None]):
    """Inject ``fault`` once ``node``'s worker starts a recovery task (its log has a line per task),
    while the block runs; yields a list that holds True once it was injected."""
    worker_log = federation / f"node-{node}" / "store" / f".worker-{node}.log"
    recoveries = lambda: worker_log.read_text().count("train.recover") if worker_log.exists() else 0  # noqa: E731
    before, done, injected = recoveries(), threading.Event(), []

    def watch() -> None:
        while not done.is_set():
            if recoveries() > before:
                fault()
                injected.append(True)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield injected
    finally:
        done.set()
        watcher.join()


def test_a_node_lost_in_a_stage_is_recorded_and_a_request_that_needs_it_waits(federation, flwr_home):
    folder = LocalFederation(federation)
    with when_recovery_starts(federation, 1, lambda: folder.down([1])) as lost_node:  # lost inside the stage
        run = flwr_run(federation, flwr_home, phase="unlearn", forget_class="4", recover_rounds=4)
    assert lost_node and run["status"] == "finished:completed", run["log"][-3000:]
    ledger = Ledger(federation / "outputs" / "e2e")
    lost = ledger.requests()[-1]
    assert lost.state == "served" and "1" in lost.served["left-out"]["recover"]  # served without it, recorded

    assert requests(federation, "submit", "--forget-client", "1") == 0
    waiting = flwr_run(federation, flwr_home, phase="serve", node_wait_seconds=5.0)
    assert waiting["status"] == "finished:failed"
    pending = ledger.requests()[-1]
    assert pending.state == "pending" and "partitions [1] are not connected" in pending.attempts[-1]["reason"]
    assert qd_app(["federation", "up", "--nodes", str(NODES), "--dir", str(federation)]) == 0
    rerun = flwr_run(federation, flwr_home, phase="serve")
    assert rerun["status"] == "finished:completed", rerun["log"][-3000:]
    done = ledger.get(pending.id)
    assert done.state == "served" and [a["outcome"] for a in done.attempts] == ["failed", "served"]


def serverapp_processes(superlink_pid: int) -> list[int]:
    """The ``flwr-serverapp`` processes the SuperLink started (its descendants, from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    family, grew = {superlink_pid}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in family} - family
        family, grew = family | children, bool(children)
    found = []
    for pid in family - {superlink_pid}:
        try:
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_the_server_process_killed_inside_recovery_leaves_the_request_running_and_a_rerun_serves_it_once(
        federation, flwr_home):
    outputs = federation / "outputs" / "e2e"
    model_before = model_digest(load_checkpoint(outputs)["state-dict"])
    superlink = LocalFederation(federation).load().superlink["pid"]

    def kill_the_server_app() -> None:
        for pid in serverapp_processes(superlink):
            os.kill(pid, signal.SIGKILL)

    with when_recovery_starts(federation, 0, kill_the_server_app) as killed:
        run = flwr_run(federation, flwr_home, phase="unlearn", forget_class="5", recover_rounds=4)
    assert killed and run["status"] != "finished:completed", run["log"][-3000:]
    ledger = Ledger(outputs)
    interrupted = ledger.requests()[-1]
    assert interrupted.request.label == "class 5" and interrupted.state == "running"
    assert model_digest(load_checkpoint(outputs)["state-dict"]) == model_before  # nothing of it applied

    rerun = flwr_run(federation, flwr_home, phase="serve")
    assert rerun["status"] == "finished:completed", rerun["log"][-3000:]
    served = ledger.get(interrupted.id)
    assert served.state == "served" and [a["outcome"] for a in served.attempts] == ["interrupted", "served"]
    assert all(attempt["model-before"] == model_before for attempt in served.attempts)
    assert [r.request.label for r in ledger.requests()].count("class 5") == 1 and ledger.verify() == []
    assert model_digest(load_checkpoint(outputs)["state-dict"]) == served.served["model-after"]


def test_a_store_damaged_inside_recovery_makes_its_client_fail_and_the_request_is_served_without_it(
        federation, flwr_home):
    store = federation / "node-2" / "store" / "e2e" / "partition-2.qdstore"
    intact = store.read_bytes()
    try:  # a real exception in node 2's ClientApp
        with when_recovery_starts(federation, 0, lambda: store.write_bytes(intact[: len(intact) // 2])) as damaged:
            run = flwr_run(federation, flwr_home, phase="unlearn", forget_class="6", recover_rounds=4)
    finally:
        store.write_bytes(intact)
    assert damaged and run["status"] == "finished:completed", run["log"][-3000:]
    served = Ledger(federation / "outputs" / "e2e").requests()[-1]
    assert served.request.label == "class 6" and served.state == "served"
    assert "is corrupt" in served.served["left-out"]["recover"]["2"]  # the client's own reason, recorded


def test_hdus_nodes_of_different_architectures_serve_a_later_client_request_from_their_repositories(
        flwr_home, tmp_path):
    folder = tmp_path / "hdus"
    up = ["federation", "up", "--nodes", str(NODES), "--dir", str(folder), "--name", "qd-hdus",
          "--client-models", "convnet-s,mlp,convnet-m"]
    assert qd_app(up) == 0
    try:
        hdus = {"method": "hdus", "forget_class": "", "hdus_epochs": 1, "hdus_distill_epochs": 2,
                "hdus_reference_size": 500}
        trained = flwr_run(folder, flwr_home, connection="qd-hdus", phase="train", **hdus)
        assert trained["status"] == "finished:completed", trained["log"][-3000:]
        record = json.loads((folder / "outputs" / "e2e" / "results.json").read_text())
        assert record["stages"][0]["details"]["main-models"] == {"0": "convnet-s", "1": "mlp", "2": "convnet-m"}
        assert qd_app(["federation", "down", "--dir", str(folder), "--node", "0", "--node", "1", "--node", "2"]) == 0
        assert qd_app(up) == 0  # new SuperNode processes: the repositories are on their disks
        assert qd_app(["requests", "submit", "--forget-client", "1", "--output-dir", str(folder / "outputs"),
                       "--experiment", "e2e"]) == 0
        served = flwr_run(folder, flwr_home, connection="qd-hdus", phase="serve", **hdus)
        assert served["status"] == "finished:completed", served["log"][-3000:]
        [request] = Ledger(folder / "outputs" / "e2e").requests()
        assert request.state == "served" and request.request.label == "client 1"
        unlearn = json.loads((folder / "outputs" / "e2e" / "results.json").read_text())["stages"][-1]
        assert unlearn["name"] == "unlearn" and unlearn["sample-gradients"] == 0
        assert unlearn["details"]["seeds-held"] == [[2], [0]]  # partitions 0 and 2 keep each other's only
        assert not list((folder / "node-1" / "store").rglob("*.hdus"))  # client 1 deleted its own state
    finally:
        assert qd_app(["federation", "down", "--dir", str(folder)]) == 0


def test_a_secure_federation_refuses_a_node_whose_key_it_does_not_know(flwr_home, tmp_path):
    folder = tmp_path / "secure"
    assert qd_app(["federation", "up", "--nodes", "2", "--dir", str(folder), "--secure", "--name", "qd-secure"]) == 0
    try:
        config = (flwr_home / "config.toml").read_text()
        assert "[superlink.qd-secure]" in config and f'root-certificates = "{folder / "certs" / "ca.crt"}"' in config
        state = LocalFederation(folder).load()
        key = folder / "keys" / "intruder"
        security.write_node_key(key)
        log = folder / "logs" / "intruder.log"
        intruder, _ = start([str(BIN / "flower-supernode"), "--superlink", state.address,
                             "--port", str(free_ports(1)[0]),
                             "--root-certificates", str(folder / "certs" / "ca.crt"),
                             "--auth-supernode-private-key", str(key),
                             "--node-config", "partition-id=0 num-partitions=2"],
                            {"FLWR_HOME": str(folder / "intruder")}, log)
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in log.read_text()
        assert all(alive for *_, alive in LocalFederation(folder).status())  # the registered ones run on
    finally:
        assert qd_app(["federation", "down", "--dir", str(folder)]) == 0
    assert "qd-secure" not in (flwr_home / "config.toml").read_text()


def test_bad_input_to_federation_says_what_was_wrong_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwrhome"))
    (tmp_path / "file").write_text("x")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [
        (["up", "--nodes", "2", "--dir", str(tmp_path / "file")], "--dir=.*: it is a file, not a folder"),
        (["up", "--nodes", "0", "--dir", str(tmp_path / "a")], "invalid option --nodes=0: must be >= 1"),
        (["up", "--nodes", "2", "--dir", str(tmp_path / "a"), "--name", "my link"], "--name='my link': letters"),
        (["up", "--nodes", "2", "--dir", str(tmp_path / "a"), "--port", str(port)],
         f"port {port} \\(superlink\\) is in use: choose another --port"),
        (["up", "--nodes", "2", "--dir", str(tmp_path / "a"), "--port", "80"], "--port=80: must leave room"),
        (["up", "--nodes", "2", "--dir", str(tmp_path / "a"), "--client-models", "mlp,resnet"],
         "--client-models='mlp,resnet': architecture names separated by ','"),
        (["status", "--dir", str(tmp_path / "a")], "no federation in .*: start one with qd-app federation up"),
        (["down", "--dir", str(tmp_path / "a")], "no federation in"),
    ]
    with busy:
        for args, message in cases:
            assert qd_app(["federation", *args]) == 2, args
            error = capsys.readouterr().err
            assert re.search(message, error), (args, error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created, no connection registered
