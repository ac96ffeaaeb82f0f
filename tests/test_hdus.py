"""HDUS: seed models, ensembles and exact client unlearning, with the server only relaying."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_idx_dataset
from test_apps import run_server, tiny_run_config
from torch import nn

from qd_app.client.hdus import ensemble_outputs, load_repository, repository_file
from qd_app.client.run import ClientRun
from qd_app.config import RunConfig
from qd_app.core.hdus import distill_seed, ensemble_probabilities, neighbours, reference_and_evaluation
from qd_app.core.models import ModelSpec, build_model
from qd_app.errors import ConfigError, RequestError
from qd_app.server.results import load_checkpoint

HETEROGENEOUS = {"method": "hdus", "client-models": "convnet-s,mlp,convnet-m,convnet-l", "hdus-reference-size": 40,
                 "hdus-epochs": 2, "hdus-distill-epochs": 2, "hdus-topology": "ring", "forget-class": ""}


def test_topologies_are_undirected_and_of_the_asked_degree():
    assert neighbours(6, "ring", 4) == {0: [1, 5], 1: [0, 2], 2: [1, 3], 3: [2, 4], 4: [3, 5], 5: [0, 4]}
    regular = neighbours(8, "regular", 3)
    assert all(len(others) == 3 for others in regular.values())
    assert all(i in regular[j] for i, others in regular.items() for j in others)
    assert neighbours(8, "regular", 4)[0] == [1, 2, 6, 7]
    assert neighbours(4, "full", 2) == {i: [j for j in range(4) if j != i] for i in range(4)}
    assert neighbours(3, "ring", 2) == {0: [1, 2], 1: [0, 2], 2: [0, 1]}


def test_the_ensemble_weighs_the_main_model_against_the_mean_of_the_seed_models():
    spec = ModelSpec("mlp", 1, 28, 10, 1, 16, "none", "none")
    main, seeds = build_model(spec, seed=0), [build_model(spec, seed=s) for s in (1, 2)]
    images = torch.randn(12, 1, 28, 28)
    alone, ensemble = ensemble_probabilities(main, seeds, images, 0.3, 5, torch.device("cpu"))
    expected_seeds = (nn.functional.softmax(seeds[0](images), 1) + nn.functional.softmax(seeds[1](images), 1)) / 2
    assert torch.allclose(alone, nn.functional.softmax(main(images), 1))
    assert torch.allclose(ensemble, 0.3 * alone + 0.7 * expected_seeds, atol=1e-6)
    assert torch.equal(ensemble_probabilities(main, [], images, 0.3, 5, torch.device("cpu"))[1], alone)


def test_a_seed_model_learns_its_teachers_outputs_on_the_reference_images():
    teacher = build_model(ModelSpec("convnet", 1, 28, 10, 2, 8, "instance", "avg"), seed=0)
    student = build_model(ModelSpec("mlp", 1, 28, 10, 1, 32, "none", "none"), seed=1)
    images = torch.randn(64, 1, 28, 28)
    settings = {"lr": 0.05, "batch_size": 16, "temperature": 3.0, "device": torch.device("cpu")}
    first = distill_seed(teacher, student, images, epochs=1, generator=torch.Generator().manual_seed(0), **settings)
    last = distill_seed(teacher, student, images, epochs=30, generator=torch.Generator().manual_seed(0), **settings)
    assert last < first / 4


def test_reference_sets_hold_no_evaluated_image(tiny_mnist_dir, tmp_path):
    config = RunConfig(data_dir=str(tiny_mnist_dir), hdus_reference_size=30)
    reference, test = reference_and_evaluation(config)
    assert len(reference) == 30 and len(test) == 70
    held_out = {tuple(image.flatten()[:50].tolist()) for image in reference.images}
    assert not held_out & {tuple(image.flatten()[:50].tolist()) for image in test.images}
    noise, full_test = reference_and_evaluation(config.replace(hdus_reference="noise"))
    assert len(noise) == 30 and len(full_test) == 100
    other_dir = write_idx_dataset(write_idx_dataset(tmp_path, "MNIST", 2, 3), "FashionMNIST", 2, 5)
    other, _ = reference_and_evaluation(config.replace(data_dir=str(other_dir), hdus_reference="other"))
    assert len(other) == 30 and other.images.shape[1:] == (1, 28, 28)
    with pytest.raises(Exception, match="hdus-reference-size=100: must be below the mnist test split's 100"):
        reference_and_evaluation(config.replace(hdus_reference_size=100))


def _client(run_config: dict, partition: int) -> ClientRun:
    return ClientRun.from_configs(run_config, {"partition-id": partition, "num-partitions": 4})


def test_heterogeneous_clients_exchange_seed_models_and_forget_a_client_exactly(tiny_mnist_dir, tmp_path):
    trained = tiny_run_config(tiny_mnist_dir, tmp_path, **HETEROGENEOUS)
    grid = run_server(trained, num_partitions=4)
    assert [m.metadata.message_type for m in grid.sent] == (["query"] * 4 + ["train.seed"] * 4
                                                            + ["evaluate.keep_seeds"] * 4 + ["evaluate.ensemble"] * 4)
    for message in grid.sent[8:12]:  # each client receives exactly its ring neighbours' seed models
        partition = grid.contexts[message.metadata.dst_node_id].node_config["partition-id"]
        assert set(message.content.array_records) == {f"seed-{(partition - 1) % 4}", f"seed-{(partition + 1) % 4}"}
    record = json.loads((tmp_path / "tiny" / "results.json").read_text())
    details = record["stages"][0]["details"]
    assert details["main-models"] == {"0": "convnet-s", "1": "mlp", "2": "convnet-m", "3": "convnet-l"}
    assert details["seeds-held"] == [[1, 3], [0, 2], [1, 3], [0, 2]] and len(details["ensemble-accuracy"]) == 4
    assert record["stages"][0]["accuracy"] == pytest.approx(details["mean-ensemble-accuracy"])
    assert load_checkpoint(tmp_path / "tiny")["state-dict"] == {}  # the server keeps no model
    assert load_repository(_client(trained, 1)).main_spec.name == "mlp"

    clients = {p: _client(trained, p) for p in range(4)}
    before = {p: load_repository(clients[p]) for p in range(4)}
    untouched = repository_file(clients[3]).read_bytes()
    grid = run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **HETEROGENEOUS, phase="unlearn",
                                      **{"forget-client": "1"}), num_partitions=4)
    sent = [m.metadata.message_type for m in grid.sent]
    assert not [t for t in sent if t.startswith("train")]  # no training work to any client
    assert sorted(grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] for m in grid.sent
                  if m.metadata.message_type == "evaluate.drop_seeds") == [0, 1, 2, 3]  # every copy found
    assert not repository_file(clients[1]).exists()  # the forgotten client deleted its own state
    assert repository_file(clients[3]).read_bytes() == untouched  # not a neighbour of 1: held nothing to delete
    images = torch.randn(20, 1, 28, 28)
    for partition in (0, 2):
        after = load_repository(clients[partition])
        assert sorted(after.neighbours) == [3]
        never_held = before[partition]
        never_held.neighbours = {p: s for p, s in never_held.neighbours.items() if p != 1}
        assert torch.equal(ensemble_outputs(clients[partition], after, images, 0.5)[1],
                           ensemble_outputs(clients[partition], never_held, images, 0.5)[1])
    request = json.loads((tmp_path / "tiny" / "results.json").read_text())["requests"][-1]
    assert request["label"] == "client 1" and "before" not in request
    unlearn = json.loads((tmp_path / "tiny" / "results.json").read_text())["stages"][-1]
    assert unlearn["name"] == "unlearn" and unlearn["sample-gradients"] == 0
    assert unlearn["details"]["partitions"] == [0, 2, 3] and unlearn["details"]["deleted-at"] == [0, 1, 2]

    offline = [{"partition-id": p, "num-partitions": 4} for p in (0, 1, 2)]  # client 3 has left
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **HETEROGENEOUS, phase="unlearn",
                               **{"forget-client": "3", "node-wait-seconds": 0.0}), node_configs=offline)
    assert [sorted(load_repository(clients[p]).neighbours) for p in (0, 2)] == [[], []]
    assert repository_file(clients[3]).read_bytes() == untouched  # on its own disk, out of reach


def test_client_models_need_a_method_without_a_global_model(tiny_mnist_dir, tmp_path):
    with pytest.raises(ConfigError, match="client-models='mlp' gives each client a model of its own, which "
                                          "method='quickdrop' \\(one global model\\) cannot use"):
        run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **{"client-models": "mlp"}))
    assert not (tmp_path / "tiny").exists()


def test_hdus_refuses_class_requests_relearning_and_a_global_method_on_its_experiment(tiny_mnist_dir, tmp_path):
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **HETEROGENEOUS), num_partitions=4)
    with pytest.raises(RequestError, match="method='hdus' forgets clients"):
        run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **{**HETEROGENEOUS, "forget-class": "3"},
                                   phase="unlearn"), num_partitions=4)
    with pytest.raises(RequestError, match="method='hdus' does not relearn"):
        run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **HETEROGENEOUS, phase="relearn",
                                   **{"forget-client": "2"}), num_partitions=4)
    global_method = {**HETEROGENEOUS, "method": "quickdrop", "client-models": ""}
    with pytest.raises(RequestError, match="was trained without a global model \\(e.g. by method='hdus'\\); "
                                           "method='quickdrop' needs one"):
        run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **global_method, phase="unlearn",
                                   **{"forget-client": "2"}), num_partitions=4)


def test_hdus_refuses_an_experiment_trained_with_a_global_model(tiny_mnist_dir, tmp_path):
    run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **{"method": "retrain", "forget-class": ""}), num_partitions=4)
    with pytest.raises(RequestError, match="was trained with one global model; method='hdus' needs the clients' "
                                           "own models"):
        run_server(tiny_run_config(tiny_mnist_dir, tmp_path, **HETEROGENEOUS, phase="unlearn",
                                   **{"forget-client": "2"}), num_partitions=4)
