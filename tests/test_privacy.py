"""The audit every in-process reply goes through (``tests/privacy.py``) catches what must not
leave a client; the in-process lifecycles of every method run under it (conftest)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from inprocess import set_task_identity
from privacy import audit_reply
from test_apps import tiny_run_config

from qd_app.config import RunConfig
from qd_app.core.models import ModelSpec, build_model


@pytest.fixture
def run_config(tiny_mnist_dir, tmp_path) -> dict:
    set_task_identity()
    return tiny_run_config(tiny_mnist_dir, tmp_path)


NODE = {"partition-id": 0, "num-partitions": 3}


def reply(**records) -> Message:
    return Message(RecordDict(records), dst_node_id=5, message_type="train")


def model_arrays(run_config: dict) -> ArrayRecord:
    return ArrayRecord(build_model(ModelSpec.from_config(RunConfig.from_run_config(run_config))).state_dict())


def test_model_parameters_and_scalar_metrics_pass(run_config):
    audit_reply(reply(arrays=model_arrays(run_config),
                      metrics=MetricRecord({"num-examples": 120, "train-loss": 0.3, "class-correct": [1] * 10})),
                run_config, NODE)


@pytest.mark.parametrize("leak", [
    {"synthetic": ArrayRecord({"images": torch.zeros(40, 1, 28, 28)})},  # a synthetic set
    {"arrays": ArrayRecord({"features.0.weight": torch.zeros(3, 3)})},  # a tensor no model has
    {"metrics": MetricRecord({"per-sample-loss": [0.1] * 50})},  # per-sample values (50 samples)
    {"metrics": ConfigRecord({"labels": b"\x01\x02\x03"})},  # raw bytes
    {"metrics": ConfigRecord({"path": "x" * 5000})},  # text beyond a message
])
def test_anything_else_leaving_a_client_is_caught(run_config, leak):
    with pytest.raises(AssertionError):
        audit_reply(reply(**leak), run_config, NODE)


def test_metrics_beyond_their_budget_are_caught(run_config):
    many = MetricRecord({f"value-{n}": 0.5 for n in range(3000)})  # 3,000 scalars: one per sample, say
    with pytest.raises(AssertionError, match="bytes of metrics beside the model"):
        audit_reply(reply(metrics=many), run_config, NODE)
