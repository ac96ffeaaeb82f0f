"""The baselines' math: FedEraser calibration, FU-MP unit scores and pruning (plain torch)."""

from __future__ import annotations

import math

import pytest
import torch

from qd_app.config import RunConfig
from qd_app.core.aggregation import calibrated_update, weighted_sum
from qd_app.core.data import load_split
from qd_app.core.models import ModelSpec, build_model
from qd_app.core.pruning import activation_statistics, prunable_layers, prune, tf_idf_scores
from qd_app.server.history import UpdateHistory


def test_calibration_keeps_the_new_direction_with_the_old_norm():
    new = {"w": torch.tensor([3.0, 4.0]), "zero": torch.zeros(2)}
    old = {"w": torch.tensor([0.0, 10.0]), "zero": torch.ones(2)}
    calibrated = calibrated_update(new, old)
    assert torch.allclose(calibrated["w"], torch.tensor([6.0, 8.0]))  # direction (0.6, 0.8), norm 10
    assert torch.equal(calibrated["zero"], torch.zeros(2))


def test_weighted_sum_normalises_the_weights():
    total = weighted_sum([{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}], [1.0, 3.0])
    assert total["w"].item() == pytest.approx(0.25 * 1 + 0.75 * 4)


def test_tf_idf_scores_by_hand():
    # 3 classes x 2 channels; target class 0
    means = torch.tensor([[3.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    # channel 0: mean 1, only class 0 >= mean -> IDF log(3/2); channel 1: all equal the mean -> log(3/4)
    scores = tf_idf_scores(means, [0])
    assert scores[0].item() == pytest.approx(0.75 * math.log(3 / 2))
    assert scores[1].item() == pytest.approx(0.25 * math.log(3 / 4))


def test_channels_and_the_norm_after_them_are_pruned_together():
    model = build_model(ModelSpec("convnet", 1, 28, 10, 2, 4, "instance", "avg"), seed=0)
    layers = prunable_layers(model, "channels")
    assert [[name for name, _ in layer.parameters] for layer in layers] == [
        ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"],
        ["features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias"],
    ]
    pruned = prune(model.state_dict(), layers, [[1], [0, 3]])
    assert pruned["features.0.weight"][1].abs().sum() == 0 and pruned["features.1.bias"][1] == 0
    assert pruned["features.4.weight"][[0, 3]].abs().sum() == 0
    assert pruned["features.4.weight"][1].abs().sum() > 0
    model.load_state_dict(pruned)
    captured = []
    dict(model.named_modules())[layers[1].module].register_forward_hook(lambda _m, _i, out: captured.append(out))
    model(torch.randn(2, 1, 28, 28))
    assert captured[0][:, [0, 3]].abs().sum() == 0  # pruned channels stay silent


def test_pruned_features_no_longer_reach_the_logits():
    model = build_model(ModelSpec("convnet", 1, 28, 10, 2, 4, "instance", "avg"), seed=0)
    [layer] = prunable_layers(model, "features")
    assert layer.parameters == (("classifier.weight", 1),) and layer.width(model) == model.classifier.in_features
    model.load_state_dict(prune(model.state_dict(), [layer], [[2, 5]]))
    features = torch.randn(3, model.classifier.in_features)
    changed = features.clone()
    changed[:, [2, 5]] += 10.0
    assert torch.equal(model.classifier(features), model.classifier(changed))
    changed[:, 0] += 10.0
    assert not torch.equal(model.classifier(features), model.classifier(changed))


@pytest.mark.parametrize("target", ["channels", "features"])
def test_activation_statistics_sum_per_class(tiny_mnist_dir, target):
    data = load_split("mnist", tiny_mnist_dir, True).subset(torch.arange(50))
    model = build_model(ModelSpec.from_config(RunConfig(model_width=8)), seed=0)
    layers = prunable_layers(model, target)
    sums, counts = activation_statistics(model, layers, data, 10, 16, torch.device("cpu"))
    assert [s.shape for s in sums] == [(10, layer.width(model)) for layer in layers]
    assert len(sums) == (3 if target == "channels" else 1)
    assert counts.tolist() == torch.bincount(data.labels, minlength=10).double().tolist()
    assert all((s >= 0).all() for s in sums)  # post-ReLU
    empty = data.subset(torch.arange(0))
    assert all(s.abs().sum() == 0 for s in activation_statistics(model, layers, empty, 10, 16, torch.device("cpu"))[0])


def test_update_history_records_every_interval_and_round_trips(tmp_path):
    history = UpdateHistory(tmp_path / "h", 2)
    assert [r for r in range(1, 8) if history.records(r)] == [1, 3, 5, 7]
    history.save(3, {"w": torch.ones(2)}, {4: {"w": torch.zeros(2)}}, {4: 17})
    history.save(1, {"w": torch.zeros(2)}, {4: {"w": torch.ones(2)}}, {4: 17})
    assert history.rounds() == [1, 3]
    assert history.load(1)["num-examples"] == {4: 17} and history.size_bytes() > 0
