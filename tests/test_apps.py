"""ClientApp and ServerApp in process: the real handlers and strategies, no Ray."""

from __future__ import annotations

import dataclasses
import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from inprocess import InProcessGrid, node_context, set_task_identity

from qd_app.core import data
from qd_app.client_app import app as client_app
from qd_app.config import RunConfig
from qd_app.errors import ConfigError, FederationError
from qd_app.core.models import ModelSpec, build_model
from qd_app.server_app import app as server_app
from qd_app.server.strategies import TrainingStrategy


def tiny_run_config(data_dir, output_dir, **overrides) -> dict:
    settings = {
        "data-dir": str(data_dir),
        "output-dir": str(output_dir),
        "store-dir": str(output_dir / "stores"),
        "phase": "train",
        "experiment": "tiny",
        "num-server-rounds": 2,
        "batch-size": 16,
        "model-width": 8,
        "alpha": 1.0,
        **overrides,
    }
    return RunConfig.from_run_config(settings).to_run_config()


def run_server(run_config: dict, num_partitions: int = 3, node_configs=None) -> InProcessGrid:
    grid = InProcessGrid(client_app, run_config, num_partitions, node_configs)
    server_app(grid, node_context(0, run_config, {}))
    return grid


def test_client_handlers_reply_with_inventory_model_and_metrics(tiny_mnist_dir, tmp_path):
    set_task_identity()
    run_config = tiny_run_config(tiny_mnist_dir, tmp_path)
    context = node_context(5, run_config, {"partition-id": 1, "num-partitions": 2})
    arrays = ArrayRecord(build_model(ModelSpec.from_config(RunConfig.from_run_config(run_config))).state_dict())

    query = client_app(Message(RecordDict({"config": ConfigRecord()}), 5, MessageType.QUERY), context)
    inventory = query.content["inventory"]
    assert inventory["partition-id"] == 1 and inventory["num-partitions"] == 2
    assert len(inventory["class-counts"]) == 10

    strategy = TrainingStrategy(None, lr=0.05, epochs=1, batch_size=16)
    config = ConfigRecord({**strategy.stage_config, "server-round": 1})
    reply = client_app(Message(RecordDict({"arrays": arrays, "config": config}), 5, MessageType.TRAIN), context)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == sum(inventory["class-counts"]) > 0
    assert metrics["sample-gradients"] == metrics["num-examples"]  # one local epoch
    assert set(reply.content["arrays"].keys()) == set(arrays.keys())

    evaluation = client_app(Message(RecordDict({"arrays": arrays}), 5, MessageType.EVALUATE), context)
    assert 0.0 <= evaluation.content["metrics"]["accuracy"] <= 1.0


def test_server_app_trains_with_distillation_and_writes_results_checkpoint_plot_and_stores(
    tiny_mnist_dir, tmp_path
):
    grid = run_server(tiny_run_config(tiny_mnist_dir, tmp_path))
    output = tmp_path / "tiny"
    results = json.loads((output / "results.json").read_text())
    assert results["config"]["data-dir"] == str(tiny_mnist_dir)
    assert results["federation"]["num-partitions"] == 3
    [stage] = results["stages"]
    assert stage["name"] == "train" and stage["rounds"] == 2
    assert stage["samples"] == 600 and stage["sample-gradients"] > 2 * 600  # real + synthetic gradients
    assert stage["seconds"] > 0 and len(stage["class-accuracy"]) == 10
    assert [entry["round"] for entry in results["rounds"]] == [0, 1, 2]
    assert stage["accuracy"] == results["rounds"][-1]["accuracy"] > 0.5
    assert (output / "model.pt").stat().st_size > 0 and (output / "model-trained.pt").exists()
    assert (output / "class_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    train_messages = [m for m in grid.sent if m.metadata.message_type == "train.distill"]
    assert len(train_messages) == 2 * 3
    stores = sorted((tmp_path / "stores" / "tiny").iterdir())
    assert [p.name for p in stores] == [f"partition-{i}.qdstore" for i in range(3)]
    assert results["stores"]["bytes"] == [p.stat().st_size for p in stores]
    assert sum(results["stores"]["synthetic-images"]) >= 600 / 100


def test_bad_run_setting_stops_the_server_with_the_setting_named(tiny_mnist_dir, tmp_path):
    run_config = tiny_run_config(tiny_mnist_dir, tmp_path)
    run_config["alpha"] = -1.0
    with pytest.raises(ConfigError, match="alpha=-1.0: must be > 0"):
        run_server(run_config)
    assert not (tmp_path / "tiny").exists()


def test_bad_node_config_stops_the_run_with_the_clients_message(tiny_mnist_dir, tmp_path):
    run_config = tiny_run_config(tiny_mnist_dir, tmp_path)
    with pytest.raises(FederationError, match="num-partitions=0: must be >= 1"):
        run_server(run_config, node_configs=[{"partition-id": 0, "num-partitions": 0}])


def test_missing_dataset_stops_the_run_with_what_to_do(tmp_path, monkeypatch):
    run_config = tiny_run_config(tmp_path / "empty-data", tmp_path, dataset="svhn")
    spec = data.DATASETS["svhn"]

    def offline(root, train, download):
        if download:
            raise ConnectionError("no network")
        return spec.read_raw(root, train, download)

    monkeypatch.setitem(data.DATASETS, "svhn", dataclasses.replace(spec, read_raw=offline))
    with pytest.raises(FederationError, match="(?s)dataset svhn is not in data-dir .*train_32x32.mat"):
        run_server(run_config, num_partitions=2)
