"""Faults injected into each stage of a request: a client that raises, one whose process crashes,
one that never answers (Flower's Grid returns without its reply), and the server killed between
two stages or inside one; and a damaged or foreign checkpoint. For each: what the ledger records, that nothing else on disk changed,
and that a rerun serves the request once: its final model equals, bit for bit, the model of
the same requests served without the fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from inprocess import InProcessGrid, node_context
from test_apps import tiny_run_config
from test_unlearning_flow import snapshot

from qd_app.client import tasks as client_tasks
from qd_app.client_app import app as client_app
from qd_app.errors import RequestError, StageFailedError
from qd_app.server import strategies
from qd_app.server.ledger import Ledger
from qd_app.server.results import load_checkpoint, model_digest, save_checkpoint
from qd_app.server_app import app as server_app

SETTINGS = {"unlearn-lr": 0.5, "unlearn-epochs": 5, "recover-epochs": 2, "relearn-epochs": 3, "relearn-lr": 0.05,
            "scale": 10}
STAGE_MESSAGES = {"unlearn": "train.unlearn", "recover": "train.recover", "relearn": "train.relearn"}
FAULTS = ("raises", "crashes", "never answers")


class FaultyGrid(InProcessGrid):
    """Delivers messages like :class:`InProcessGrid`, except that messages of ``message_type`` to
    ``nodes`` (all when None) crash their ClientApp's process or get no reply in time."""

    def __init__(self, run_config: dict, fault: str, message_type: str, nodes: set[int] | None = None) -> None:
        super().__init__(client_app, run_config, 3)
        self.fault, self.message_type, self.nodes = fault, message_type, nodes

    def _hit(self, message: Message) -> bool:
        return message.metadata.message_type == self.message_type and (
            self.nodes is None or message.metadata.dst_node_id in self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive([m for m in messages if not self._hit(m)], timeout=timeout)
        for message in filter(self._hit, messages):
            self.sent.append(message)
            if self.fault == "crashes":  # what a SuperNode reports for a ClientApp process that died
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="ClientApp process exited"),
                                       reply_to=message))
        return replies


def run(run_config: dict, fault: str | None = None, message_type: str = "", nodes: set[int] | None = None,
        monkeypatch=None) -> None:
    """One ServerApp run; a client that ``raises`` raises inside the app's own task code."""
    if fault == "raises":
        task = client_tasks.TASKS[message_type]

        def disk_full(client, content):
            if nodes is None or 100 + client.node.partition_id in nodes:
                raise OSError("disk full")
            return task(client, content)

        monkeypatch.setitem(client_tasks.TASKS, message_type, disk_full)
    grid = FaultyGrid(run_config, fault or "", message_type if fault in ("crashes", "never answers") else "", nodes)
    try:
        server_app(grid, node_context(0, run_config, {}))
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def current_model(folder: Path) -> str:
    """The checksum of the experiment's current model (the ledger's ``model-after``)."""
    return model_digest(torch.load(folder / "tiny" / "model.pt", weights_only=True)["state-dict"])


def files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` but the ledger, with a hash of its content."""
    return {name: digest for name, digest in snapshot(folder).items() if "ledger.sqlite" not in name}


def lifecycle(folder: Path, tiny_mnist_dir: Path) -> tuple[dict, dict, dict]:
    """The runs of the test: training, a request to forget class 3, then relearning it."""
    base = tiny_run_config(tiny_mnist_dir, folder, **SETTINGS)
    return ({**base, "phase": "train"}, {**base, "phase": "unlearn", "forget-class": "3"},
            {**base, "phase": "relearn", "forget-class": ""})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mnist_dir) -> dict[str, str]:
    """The model after each request, served without faults."""
    folder = tmp_path_factory.mktemp("reference")
    train, unlearn, relearn = lifecycle(folder, tiny_mnist_dir)
    digests = {}
    for name, config in (("train", train), ("unlearn", unlearn), ("relearn", relearn)):
        run(config)
        digests[name] = current_model(folder)
    return digests


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", list(STAGE_MESSAGES))
def test_a_stage_where_every_client_fails_leaves_the_request_pending_and_a_rerun_serves_it_once(
        stage, fault, tmp_path, tiny_mnist_dir, reference, monkeypatch):
    train, unlearn, relearn = lifecycle(tmp_path, tiny_mnist_dir)
    run(train)
    assert current_model(tmp_path) == reference["train"]
    request = relearn if stage == "relearn" else unlearn
    if stage == "relearn":
        run(unlearn)
    before = files(tmp_path)
    with pytest.raises(StageFailedError, match=f"{stage} round 1: " + (
            "no client replied" if fault == "never answers" else "every client failed")):
        run(request, fault, STAGE_MESSAGES[stage], monkeypatch=monkeypatch)
    pending = Ledger(tmp_path / "tiny").requests()[-1]
    assert pending.state == "pending" and [a["outcome"] for a in pending.attempts] == ["failed"]
    assert files(tmp_path) == before  # model, results, stores untouched
    run(request)
    served = Ledger(tmp_path / "tiny").requests()[-1]
    assert served.state == "served" and [a["outcome"] for a in served.attempts] == ["failed", "served"]
    assert len(Ledger(tmp_path / "tiny").requests()) == (2 if stage == "relearn" else 1)
    assert current_model(tmp_path) == reference["relearn" if stage == "relearn" else "unlearn"]


@pytest.mark.parametrize("fault", FAULTS)
def test_training_where_every_client_fails_stops_and_a_rerun_trains_the_same_model(
        fault, tmp_path, tiny_mnist_dir, reference, monkeypatch):
    train, _, _ = lifecycle(tmp_path, tiny_mnist_dir)
    with pytest.raises(StageFailedError, match="train round 1: "):
        run(train, fault, "train.distill", monkeypatch=monkeypatch)
    assert not (tmp_path / "tiny" / "model.pt").exists() and not Ledger(tmp_path / "tiny").requests()
    run(train)
    assert current_model(tmp_path) == reference["train"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", ["unlearn", "recover"])
def test_a_client_failing_in_a_stage_is_left_out_and_recorded(stage, fault, tmp_path, tiny_mnist_dir, monkeypatch):
    train, unlearn, _ = lifecycle(tmp_path, tiny_mnist_dir)
    run(train)
    warnings: list[str] = []
    monkeypatch.setattr(strategies, "log", lambda level, message, *args: warnings.append(message % args))
    run(unlearn, fault, STAGE_MESSAGES[stage], nodes={100}, monkeypatch=monkeypatch)
    [request] = Ledger(tmp_path / "tiny").requests()
    assert request.state == "served"
    reason = "no reply" if fault == "never answers" else ("disk full" if fault == "raises" else "process exited")
    assert any(f"{stage} round" in w and "left out of the average" in w for w in warnings)
    results = (tmp_path / "tiny" / "results.json").read_text()
    assert '"left-out"' in results and reason in results


class Killed(BaseException):
    """The server process dying: not an error the app handles, it just stops."""


@pytest.mark.parametrize("where", ["between unlearning and recovery", "inside recovery"])
def test_the_server_killed_during_a_request_leaves_it_running_and_a_rerun_serves_it_once(
        where, tmp_path, tiny_mnist_dir, reference, monkeypatch):
    train, unlearn, _ = lifecycle(tmp_path, tiny_mnist_dir)
    run(train)
    before = files(tmp_path)
    configure = strategies.RecoverStrategy.configure_train

    def die(self, server_round, *args, **kwargs):
        if where == "between unlearning and recovery" or server_round == 2:
            raise Killed()
        return configure(self, server_round, *args, **kwargs)

    monkeypatch.setattr(strategies.RecoverStrategy, "configure_train", die)
    with pytest.raises(Killed):
        run(unlearn)
    monkeypatch.undo()
    [interrupted] = Ledger(tmp_path / "tiny").requests()
    assert interrupted.state == "running"
    assert files(tmp_path) == before  # the model is saved only when a request is served
    run(unlearn)
    [request] = Ledger(tmp_path / "tiny").requests()
    assert request.state == "served" and [a["outcome"] for a in request.attempts][-1] == "served"
    assert current_model(tmp_path) == reference["unlearn"]


def _resaved(path: Path, **changes) -> None:
    """The checkpoint saved again, valid, with some metadata changed."""
    content = load_checkpoint(path.parent, path.name)
    save_checkpoint(path.parent, content.pop("state-dict"), {**content, **changes}, path.name)


CHECKPOINT_DAMAGE = {
    "zero-length": (lambda path: path.write_bytes(b""), "cannot be read as a checkpoint"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
                  "cannot be read as a checkpoint"),
    "bit flip": (lambda path: path.write_bytes(_flipped(path.read_bytes())), "is damaged|cannot be read"),
    "parameters changed": (lambda path: _tampered(path), "is damaged: its contents do not match the checksum"),
    "not a checkpoint": (lambda path: path.write_text("model"), "cannot be read as a checkpoint"),
    "another format version": (lambda path: torch.save({**load_checkpoint(path.parent), "format-version": 2}, path),
                               "has checkpoint format 2, this app reads 1"),
    "another dataset": (lambda path: _resaved(path, dataset="fashion-mnist"),
                        "trained with dataset 'fashion-mnist', this run has 'mnist'"),
    "another model": (lambda path: _resaved(path, model={**load_checkpoint(path.parent)["model"], "width": 4}),
                      "trained with model .*'width': 4"),
    "another experiment": (lambda path: _resaved(path, experiment="other"),
                           "trained with experiment 'other', this run has 'tiny'"),
}


def _tampered(path: Path) -> None:
    """A readable checkpoint whose parameters no longer match its checksum (a flip torch.load cannot see)."""
    content = torch.load(path, weights_only=True)
    first = next(iter(content["state-dict"].values()))
    first.view(-1)[0] += 1.0
    torch.save(content, path)


def _flipped(content: bytes) -> bytes:
    middle = len(content) // 2  # inside the parameters, the bulk of the file
    return content[:middle] + bytes([content[middle] ^ 0x10]) + content[middle + 1:]


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_or_foreign_checkpoint_is_refused_with_what_to_do_and_nothing_changes(
        damage, tmp_path, tiny_mnist_dir):
    train, unlearn, _ = lifecycle(tmp_path, tiny_mnist_dir)
    run(train)
    damage_file, message = CHECKPOINT_DAMAGE[damage]
    damage_file(tmp_path / "tiny" / "model.pt")
    before = snapshot(tmp_path)
    with pytest.raises(RequestError, match=message) as refused:
        run(unlearn)
    assert "phase=train" in str(refused.value)  # what to do
    assert snapshot(tmp_path) == before and not Ledger(tmp_path / "tiny").requests()


def test_a_checkpoint_of_an_earlier_version_without_checksum_or_trained_partitions_is_served(
        tmp_path, tiny_mnist_dir, reference):
    train, unlearn, _ = lifecycle(tmp_path, tiny_mnist_dir)
    run(train)
    path = tmp_path / "tiny" / "model.pt"
    content = torch.load(path, weights_only=True)
    torch.save({key: value for key, value in content.items() if key not in ("checksum", "trained-partitions")}, path)
    run(unlearn)
    assert Ledger(tmp_path / "tiny").requests()[-1].state == "served"
    assert current_model(tmp_path) == reference["unlearn"]
