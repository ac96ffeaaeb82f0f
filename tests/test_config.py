"""The run settings: defaults agree with pyproject, bad values get one clear message."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qd_app.config import ARCHITECTURES, DATASET_NAMES, MODEL_NAMES, RunConfig
from qd_app.core.data import DATASETS
from qd_app.core.models import MODEL_BUILDERS
from qd_app.errors import ConfigError
from qd_app.node_config import NodeSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_holds_every_setting_with_the_dataclass_default():
    assert pyproject_config() == RunConfig().to_run_config()


def test_registries_match_the_allowed_names():
    assert set(DATASETS) == set(DATASET_NAMES)
    assert set(MODEL_BUILDERS) == set(MODEL_NAMES) | {family for family, _, _ in ARCHITECTURES.values()}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dataset", "imagenet", "dataset='imagenet': must be one of mnist, fashion-mnist, cifar10, svhn"),
        ("alpha", 0, "alpha=0.0: must be > 0"),
        ("alpha", -1.5, "alpha=-1.5: must be > 0"),
        ("alpha", "high", "alpha='high': must be a finite number"),
        ("lr", float("inf"), "lr=inf: must be a finite number"),
        ("num-server-rounds", float("nan"), "num-server-rounds=nan: must be an integer"),
        ("num-server-rounds", 0, "num-server-rounds=0: must be >= 1"),
        ("num-server-rounds", 2.5, "num-server-rounds=2.5: must be an integer"),
        ("fraction-train", 1.5, "fraction-train=1.5: must be in (0, 1]"),
        ("lr", 0.0, "lr=0.0: must be > 0"),
        ("device", "tpu", "device='tpu': must be auto, cpu, cuda or cuda:<index>"),
        ("data-dir", "relative/path", "data-dir='relative/path': must be an absolute path"),
        ("output-dir", "out", "output-dir='out': must be an absolute path"),
        ("experiment", "../escape", "experiment='../escape': must be a folder name"),
        ("model-norm", "layer", "model-norm='layer': must be one of instance, batch, none"),
        ("client-models", "convnet-s,resnet", "client-models='convnet-s,resnet': must be architecture names "
         "separated by ',' (one per partition, cycled), each one of convnet-s, convnet-m, convnet-l, mlp"),
        ("hdus-seed-model", "convnet", "hdus-seed-model='convnet': must be one of convnet-s, convnet-m"),
        ("hdus-reference", "imagenet", "hdus-reference='imagenet': must be one of holdout, other, noise"),
        ("hdus-topology", "star", "hdus-topology='star': must be one of ring, regular, full"),
        ("hdus-lambda", 1.5, "hdus-lambda=1.5: must be in [0, 1]"),
        ("hdus-degree", 1, "hdus-degree=1: must be >= 2"),
    ],
)
def test_bad_setting_names_the_key_and_what_is_allowed(key, value, expected):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_run_config({key: value})
    assert expected in str(error.value)


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) num-rounds"):
        RunConfig.from_run_config({"num-rounds": 3})


def test_integers_are_accepted_for_float_settings_and_paths_expand_home():
    config = RunConfig.from_run_config({"alpha": 1, "data-dir": "~/datasets"})
    assert config.alpha == 1.0 and isinstance(config.alpha, float)
    assert config.data_path == Path.home() / "datasets"


def test_empty_paths_default_under_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = RunConfig(experiment="exp1")
    assert config.output_path == tmp_path / "qd_app" / "outputs" / "exp1"
    assert config.data_path == tmp_path / "qd_app" / "data"
    resolved = config.resolved_run_config()
    assert resolved["data-dir"] == str(tmp_path / "qd_app" / "data")
    assert resolved["output-dir"] == str(tmp_path / "qd_app" / "outputs")


@pytest.mark.parametrize(
    ("node_config", "expected"),
    [
        ({"partition-id": 0, "num-partitions": 0}, "num-partitions=0: must be >= 1"),
        ({"partition-id": 3, "num-partitions": 3}, "partition-id=3: must be in [0, 2]"),
        ({"num-partitions": 3}, "node_config has no partition-id"),
        ({"partition-id": 0, "num-partitions": 2, "data-dir": "rel"}, "data-dir='rel': must be an absolute path"),
        ({"partition-id": 0, "num-partitions": 2, "client-model": "vgg"}, "client-model='vgg': must be one of "
         "convnet-s, convnet-m, convnet-l, mlp"),
    ],
)
def test_bad_node_config_is_refused(node_config, expected):
    with pytest.raises(ConfigError) as error:
        NodeSettings.from_node_config(node_config)
    assert expected in str(error.value)


def test_node_data_dir_replaces_the_run_setting(tmp_path):
    node = NodeSettings.from_node_config({"partition-id": 1, "num-partitions": 2, "data-dir": str(tmp_path)})
    assert node.apply(RunConfig()).data_path == tmp_path


def test_client_models_cycle_over_partitions_and_a_node_names_its_own():
    config = RunConfig(client_models="convnet-s, convnet-l,mlp")
    assert [config.client_model(p) for p in range(5)] == ["convnet-s", "convnet-l", "mlp", "convnet-s", "convnet-l"]
    assert RunConfig().client_model(3) is None
    node = NodeSettings.from_node_config({"partition-id": 1, "num-partitions": 4, "client-model": "mlp"})
    assert node.apply(config).client_model(node.partition_id) == "mlp"


@pytest.mark.parametrize("preset", sorted((PYPROJECT.parent / "presets").glob("*.toml")), ids=lambda p: p.name)
def test_presets_are_valid_overrides(preset):
    overrides = tomllib.loads(preset.read_text())
    assert set(overrides) <= set(pyproject_config())
    RunConfig.from_run_config({**pyproject_config(), **overrides})
