"""Methods of one's own, defined here and served end to end without editing the package:
by import path in the run config, from a ServerApp of one's own, and by swapping one strategy
class of a built-in method. Also the two stage shapes beside FedAvg: server-only and relay."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from inprocess import InProcessGrid, node_context
from test_apps import run_server, tiny_run_config

from qd_app.client_app import app as client_app
from qd_app.config import RunConfig
from qd_app.errors import RequestError
from qd_app.methods import UnlearningMethod
from qd_app.methods.quickdrop import QuickDrop
from qd_app.server.strategies import RecoverStrategy
from qd_app.server.experiment import run_phase
from qd_app.server.stages import RelayStage, ServerStage, StagePlan


class MaskClasses(ServerStage):
    """Server-only unlearning: the forgotten classes' logits can no longer win."""

    stage_name = "mask"

    def __init__(self, classes: list[int]) -> None:
        super().__init__()
        self.classes = classes

    def update(self, server_round, arrays):
        state = arrays.to_torch_state_dict()
        state["classifier.weight"][self.classes] = 0.0
        state["classifier.bias"][self.classes] = -1e4
        return ArrayRecord(state)


class ForgetByMasking(UnlearningMethod):
    """A method of one's own: forgets classes on the server alone, never contacting a client."""

    name = "mask"
    title = "Masking"

    def check(self, ctx, action, request):
        if request.kind == "client" or action == "relearn":
            raise RequestError("method mask forgets classes only, and for good")

    def unlearn(self, ctx, request, before, after, arrays):
        return [StagePlan(lambda: MaskClasses(sorted(after.classes)), 1)]


class Repair(RecoverStrategy):
    """QuickDrop's recovery under another name in the records."""

    stage_name = "repair"


class QuickDropWithRepair(QuickDrop):
    recover_strategy = Repair


own_app = ServerApp()


@own_app.main()
def own_main(grid: Grid, context: Context) -> None:
    """The README's example: a ServerApp that runs a phase with a method object."""
    run_phase(grid, RunConfig.from_run_config(context.run_config), method=ForgetByMasking())


@pytest.fixture(scope="module")
def trained(tiny_mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    config = tiny_run_config(tiny_mnist_dir, root, **{"num-server-rounds": 3, "unlearn-lr": 0.5, "scale": 10})
    run_server(config)
    return root, config


def copy_of(trained, tmp_path) -> dict:
    root, config = trained
    shutil.copytree(root / "tiny", tmp_path / "tiny")
    return {**config, "output-dir": str(tmp_path), "store-dir": str(root / "stores")}


def results(tmp_path) -> dict:
    return json.loads((tmp_path / "tiny" / "results.json").read_text())


def assert_served_on_the_server_alone(grid, record):
    """The request was served with zero bytes and no message beyond the federation's inventory."""
    assert {m.metadata.message_type for m in grid.sent} == {"query"}
    [stage] = [s for s in record["stages"] if s["run"] == 1]
    assert stage["name"] == "mask" and stage["bytes"] == 0 and stage["rounds"] == 1 and stage["compute-seconds"] > 0
    [request] = record["requests"]
    assert request["before"]["forget-accuracy"] > 0.5
    assert request["after-mask"]["forget-accuracy"] == 0.0
    assert request["after-mask"]["retain-accuracy"] >= request["before"]["retain-accuracy"] - 0.05


def test_a_method_named_by_import_path_is_served_with_a_server_only_stage(trained, tmp_path):
    config = copy_of(trained, tmp_path)
    grid = run_server({**config, "phase": "unlearn", "forget-class": "3",
                       "method": "test_custom_method:ForgetByMasking"})
    record = results(tmp_path)
    assert_served_on_the_server_alone(grid, record)
    with pytest.raises(RequestError, match="method mask forgets classes only"):
        run_server({**config, "phase": "relearn", "forget-class": "", "method": "test_custom_method:ForgetByMasking"})


def test_a_server_app_of_ones_own_runs_a_phase_with_a_method_object(trained, tmp_path):
    config = copy_of(trained, tmp_path)
    run_config = {**config, "phase": "unlearn", "forget-class": "3"}
    grid = InProcessGrid(client_app, run_config, 3)
    own_app(grid, node_context(0, run_config, {}))
    assert_served_on_the_server_alone(grid, results(tmp_path))
    assert results(tmp_path)["config"]["method"] == "quickdrop"  # the object, not the setting, chose the method


def test_a_subclass_swaps_one_strategy_class_of_a_built_in_method(trained, tmp_path):
    config = copy_of(trained, tmp_path)
    grid = run_server({**config, "phase": "unlearn", "forget-class": "3",
                       "method": "test_custom_method:QuickDropWithRepair"})
    record = results(tmp_path)
    assert [s["name"] for s in record["stages"] if s["run"] == 1] == ["unlearn", "repair"]
    assert record["requests"][0]["after-repair"]["forget-accuracy"] <= 0.1
    assert {m.metadata.message_type for m in grid.sent} == {"query", "train.unlearn", "train.recover"}


# --------------------------------------------------------------------------- relay stage
relay_app = ClientApp()


@relay_app.query("seed")
def share_seed(msg: Message, context: Context) -> Message:
    """Reply with a small model that says which partition made it."""
    partition = float(context.node_config["partition-id"])
    seed = ArrayRecord({"w": Array(np.full(4, partition, dtype=np.float32))})
    return Message(RecordDict({"arrays": seed}), reply_to=msg)


@relay_app.query("keep")
def keep(msg: Message, context: Context) -> Message:
    """Keep a neighbour's seed model."""
    context.state["kept"] = msg.content["arrays"]
    return Message(RecordDict({"metrics": MetricRecord({"compute-seconds": 0.5})}), reply_to=msg)


class RingRelay(RelayStage):
    """Round 1 collects every client's seed model; round 2 hands each to the next client of a ring."""

    stage_name = "ring"

    def __init__(self) -> None:
        super().__init__()
        self.forward: list[Message] = []

    def messages(self, server_round, grid):
        if server_round == 1:
            return [Message(RecordDict(), dst_node_id=node, message_type="query.seed") for node in grid.get_node_ids()]
        forward, self.forward = self.forward, []
        return forward

    def receive(self, server_round, replies):
        nodes = sorted(reply.metadata.src_node_id for reply in replies)
        for reply in replies:
            if server_round == 1:
                neighbour = nodes[(nodes.index(reply.metadata.src_node_id) + 1) % len(nodes)]
                self.forward.append(Message(RecordDict({"arrays": reply.content["arrays"]}), dst_node_id=neighbour,
                                            message_type="query.keep"))


def test_a_relay_stage_addresses_each_message_and_aggregates_nothing():
    grid = InProcessGrid(relay_app, {}, 3)
    model = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    evaluated = []
    arrays, cost = RingRelay().run(grid, model, 5, lambda server_round, _: evaluated.append(server_round))
    assert arrays is model and evaluated == [0]  # no global model changes, so none is evaluated
    kept = {node - 100: context.state["kept"]["w"].numpy().tolist() for node, context in grid.contexts.items()}
    assert kept == {1: [0.0] * 4, 2: [1.0] * 4, 0: [2.0] * 4}  # each client holds its predecessor's
    assert [m.metadata.message_type for m in grid.sent] == ["query.seed"] * 3 + ["query.keep"] * 3
    assert cost.rounds == 2  # round 3 had nothing to send
    seed_bytes = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))}).count_bytes()
    assert cost.bytes_sent == cost.bytes_received == 3 * seed_bytes  # three seeds up, the same three down
    assert cost.compute_seconds == pytest.approx(1.5)
