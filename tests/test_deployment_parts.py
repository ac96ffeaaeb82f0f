"""The pieces that make a real federation's rounds short, each on its own: packed arrays, the
node's worker process, the SuperNode launcher's shorter waits, the SuperExec's warm ClientApp starts;
and the simulation Grid's shorter wait for replies."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from multiprocessing.connection import Client

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.superlink.grid import InMemoryGrid
from inprocess import node_context, set_task_identity
from test_apps import tiny_run_config

from qd_app import protocol
from qd_app.client.remote import worker_place
from qd_app.client_app import app as client_app
from qd_app.config import RunConfig
from qd_app.core.models import ModelSpec, build_model
from qd_app.deploy import supernode
from qd_app.node_config import NodeSettings
from qd_app.server import grid as server_grid


def test_packed_arrays_come_back_exactly():
    state = {"w": torch.randn(3, 4), "steps": torch.tensor(7, dtype=torch.int64), "b": torch.randn(4).double()}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"lr": 0.1})})
    packed = protocol.pack_arrays(content)
    assert protocol.is_packed(packed) and list(packed["arrays"].keys()) == [protocol.PACKED]
    back = protocol.unpack_arrays(packed)["arrays"].to_torch_state_dict()
    assert list(back) == ["w", "steps", "b"]
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    assert protocol.unpack_arrays(content) is content  # nothing packed: unchanged


def test_the_simulation_grid_looks_for_replies_every_hundredth_of_a_second(monkeypatch):
    def simulation_grid() -> InMemoryGrid:
        grid = InMemoryGrid.__new__(InMemoryGrid)  # the attribute that matters; no LinkState needed
        grid.pull_interval = 0.1
        return grid

    grid = simulation_grid()
    assert server_grid.for_short_rounds(grid) is grid and grid.pull_interval == server_grid.SIMULATION_POLL_INTERVAL_S
    monkeypatch.setenv(server_grid.PLAIN_GRID, "1")  # Flower's Grid as it is, the baseline
    plain = simulation_grid()
    assert server_grid.for_short_rounds(plain) is plain and plain.pull_interval == 0.1


def train_message(run_config: dict, packed: bool) -> Message:
    arrays = ArrayRecord(build_model(ModelSpec.from_config(RunConfig.from_run_config(run_config)), seed=1).state_dict())
    config = ConfigRecord({"lr": 0.05, "epochs": 1, "batch-size": 16, "momentum": 0.9, "weight-decay": 0.0,
                           "max-steps": 3, "server-round": 1})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(protocol.pack_arrays(content) if packed else content, 3, "train")


def test_a_node_worker_answers_as_the_clientapp_does_in_process(tiny_mnist_dir, tmp_path):
    set_task_identity()
    run_config = tiny_run_config(tiny_mnist_dir, tmp_path)
    node_config = {"partition-id": 1, "num-partitions": 3}
    in_process = client_app(train_message(run_config, packed=False), node_context(3, run_config, node_config))
    worker_node = {**node_config, "worker": True}
    try:
        by_worker = client_app(train_message(run_config, packed=True), node_context(3, run_config, worker_node))
        assert protocol.is_packed(by_worker.content)  # answered in kind
        expected = in_process.content["arrays"].to_torch_state_dict()
        got = protocol.unpack_arrays(by_worker.content)["arrays"].to_torch_state_dict()
        assert all(torch.equal(got[key], expected[key]) for key in expected)  # the same seeded local SGD
        assert by_worker.content["metrics"]["num-examples"] == in_process.content["metrics"]["num-examples"]
        bad = client_app(train_message(run_config, packed=True),
                         node_context(3, {**run_config, "alpha": -1.0}, worker_node))
        assert bad.has_error() and "ConfigError: invalid setting alpha=-1.0" in bad.error.reason
    finally:
        address, key = worker_place(run_config, NodeSettings.from_node_config(worker_node))
        with Client(address, family="AF_UNIX", authkey=key.read_bytes()) as connection:
            connection.send("stop")
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_the_clientapp_process_imports_neither_torch_nor_the_task_code():
    probe = "import sys, qd_app.client_app; print(sorted(m for m in ('torch', 'qd_app.client.tasks') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_supernode_launcher_caps_exactly_the_waits_flower_hard_codes(monkeypatch):
    from flwr.supernode import start_client_internal  # pylint: disable=import-outside-toplevel

    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source  # the waits of the pinned Flower
    assert inspect.getmodule(start_client_internal.time) is not None  # reached as the module's `time`
    slept = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    clock = supernode.capped_clock(0.25)
    clock.sleep(3)
    clock.sleep(0.1)
    assert slept == [0.25, 0.1] and clock.time is supernode.time.time


ZYGOTE_PROBE = """
import os, sys, time
from pathlib import Path
from qd_app.deploy.superexec import Zygote

out = Path(sys.argv[1])
def entry_point():
    (out / str(os.getpid())).write_text(" ".join(sys.argv))
    sys.exit(0)

zygote = Zygote.start(entry_point)
zygote.popen(["flwr-clientapp", "--token", "a"])
zygote.popen(["flwr-clientapp", "--token", "b"])
while len(list(out.iterdir())) < 2:
    time.sleep(0.01)
zygote.close()
os.waitpid(zygote.pid, 0)
print(zygote.pid)
"""


def test_the_zygote_forks_one_process_per_launch_and_ends_with_its_superexec(tmp_path):
    result = subprocess.run([sys.executable, "-c", ZYGOTE_PROBE, str(tmp_path)], capture_output=True, text=True,
                            timeout=60, check=True)
    zygote = int(result.stdout)
    launched = {int(path.name): path.read_text() for path in tmp_path.iterdir()}
    assert sorted(launched.values()) == ["flwr-clientapp --token a", "flwr-clientapp --token b"]
    assert zygote not in launched and len(launched) == 2


def test_a_launch_after_the_zygote_is_gone_starts_the_process_the_usual_way(tmp_path):
    from qd_app.deploy.superexec import Zygote  # pylint: disable=import-outside-toplevel

    read, write = os.pipe()
    os.close(read)
    process = Zygote(write, pid=0).popen([sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"])
    assert process.wait(timeout=30) == 0 and (tmp_path / "ran").exists()


def test_flower_still_waits_for_objects_where_the_launchers_shorten_the_wait():
    from flwr.superlink.grid import http_grid  # pylint: disable=import-outside-toplevel
    from flwr.supernode import start_client_internal  # pylint: disable=import-outside-toplevel
    from flwr.supernode.runtime import run_clientapp  # pylint: disable=import-outside-toplevel

    for function in (start_client_internal.pull_objects, run_clientapp.pull_and_inflate_object_from_tree,
                     http_grid.pull_objects):
        assert "initial_backoff" in inspect.signature(function).parameters
    assert "subprocess.Popen(command)" in inspect.getsource(start_client_internal)  # how it starts the SuperExec
