"""Property-based tests of the settings layer (run config, node config, request grammar,
``qd-app`` arguments): any value is either accepted and means what it says, or refused with
one message that names the setting and what is allowed, and nothing on disk changes."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qd_app.cli import main as qd_app_main
from qd_app.config import ARCHITECTURES, RunConfig, resolve_dir
from qd_app.errors import ConfigError
from qd_app.node_config import NodeSettings
from qd_app.request import parse_requests

KEYS = sorted(RunConfig().to_run_config())
PATH_KEYS = ("output-dir", "data-dir", "store-dir")
# every kind of value a run config or node config can carry (Flower's TOML scalars)
VALUES = st.one_of(st.text(max_size=24), st.integers(-10**9, 10**9), st.floats(), st.booleans())
PATHS = st.one_of(st.text(max_size=24), st.text(max_size=24).map(lambda text: "/" + text),
                  st.sampled_from(["~", "~/x", "~nobody-here/x", "/a/../..", "/tmp/a\x00b", "/x\n", "/" + "x" * 300]))
ONE_MESSAGE = re.compile(r"invalid setting (?P<key>[a-z0-9-]+)=(?P<value>.+?): \S.*", re.DOTALL)


def refused_with_one_message(error: ConfigError, key: str) -> None:
    """The message names ``key``, shows the value and says what is allowed (or, for a value that
    contradicts another setting, names both: ``forget-class=... and forget-client=...``)."""
    match = ONE_MESSAGE.fullmatch(str(error))
    assert (match is not None and match["key"] == key) or f"{key}=" in str(error), str(error)


def files_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_of_a_setting_is_accepted_as_its_type_or_refused_naming_the_setting(key, value):
    try:
        config = RunConfig.from_run_config({key: value})
    except ConfigError as error:
        refused_with_one_message(error, key)
        return
    stored = config.to_run_config()[key]
    assert type(stored) is type(RunConfig().to_run_config()[key])
    assert stored == value and (not isinstance(stored, float) or stored == stored)  # finite numbers only
    assert RunConfig.from_run_config(config.to_run_config()) == config


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=20).filter(lambda key: key not in KEYS), value=VALUES)
def test_an_unknown_setting_is_refused_by_name(key, value):
    try:
        RunConfig.from_run_config({key: value})
    except ConfigError as error:
        assert repr(key) in str(error) or key in str(error)
    else:
        raise AssertionError(f"unknown setting {key!r} accepted")


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(PATH_KEYS), value=PATHS, experiment=st.text(max_size=16))
def test_paths_and_experiments_stay_inside_their_roots_and_touch_nothing(key, value, experiment):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        before = files_under(root)
        try:
            config = RunConfig.from_run_config({key: value, "experiment": experiment,
                                                **{k: str(root / k) for k in PATH_KEYS if k != key}})
        except ConfigError as error:
            assert str(error).startswith(("invalid setting experiment=", f"invalid setting {key}="))
        else:
            assert "\0" not in value and Path(resolve_dir(key, value, "x")).is_absolute()
            assert config.output_path.parent == resolve_dir("output-dir", config.output_dir, "outputs")
            assert config.output_path.name == experiment and experiment not in (".", "..")
            assert "/" not in experiment and "\n" not in experiment
        assert files_under(root) == before


@settings(max_examples=300, deadline=None)
@given(node_config=st.dictionaries(
    st.sampled_from(["partition-id", "num-partitions", "data-dir", "store-dir", "worker", "client-model"]),
    VALUES, max_size=6))
def test_any_node_config_is_accepted_as_meant_or_refused_naming_the_setting(node_config):
    try:
        node = NodeSettings.from_node_config(node_config)
    except ConfigError as error:
        message = str(error)
        assert message.startswith("node_config has no ") or ONE_MESSAGE.fullmatch(message), message
        return
    assert 0 <= node.partition_id < node.num_partitions
    assert node.client_model is None or node.client_model in ARCHITECTURES
    assert isinstance(node.worker, bool)
    for path in (node.data_dir, node.store_dir):
        assert path is None or Path(path).expanduser().is_absolute()


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="0123456789+,- al x", max_size=12), kind=st.sampled_from(["class", "client"]),
       limit=st.sampled_from([None, 10]))
def test_request_grammar_parses_or_refuses_with_the_setting_name(text, kind, limit):
    key = f"forget-{kind}"
    try:
        requests = parse_requests(key, text, kind, limit)
    except ConfigError as error:
        assert str(error).startswith(f"invalid setting {key}={text.strip()!r}: "), str(error)
        return
    for request in requests:
        assert request.kind == kind and list(request.targets) == sorted(set(request.targets))
        assert all(t >= 0 and (limit is None or t < limit) for t in request.targets)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(experiment=st.text(max_size=12), spec=st.text(alphabet="0123456789+,-a ", max_size=8),
       kind=st.sampled_from(["--forget-class", "--forget-client"]))
def test_qd_app_submit_writes_only_a_valid_request_and_only_into_its_experiment(experiment, spec, kind, capsys):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        status = qd_app_main(["requests", "submit", f"--output-dir={root / 'out'}", f"--experiment={experiment}",
                              f"{kind}={spec}"])
        error = capsys.readouterr().err
        if status == 2:
            assert error.startswith("qd-app: error: ") and error.count("\n") == 1, error
            assert files_under(root) == []
        else:
            assert status == 0
            assert all(path.is_relative_to(root / "out" / experiment) or path == root / "out"
                       for path in files_under(root))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=st.integers(-3, 0) | st.integers(1, 4),
       name=st.text(max_size=10), client_models=st.text(alphabet="convet-smlp,", max_size=14))
def test_federation_up_with_a_bad_option_starts_nothing_and_writes_nothing(nodes, name, client_models, capsys):
    models = [m.strip() for m in client_models.split(",")] if client_models.strip() else []
    valid = nodes >= 1 and re.fullmatch(r"[A-Za-z0-9_-]+", name) and all(m in ARCHITECTURES for m in models)
    if valid:
        return  # a valid command starts a federation: the deployment tests run those
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        status = qd_app_main(["federation", "up", f"--dir={root / 'federation'}", f"--nodes={nodes}",
                              f"--name={name}", f"--client-models={client_models}"])
        error = capsys.readouterr().err
        assert status == 2 and error.startswith("qd-app: error: invalid option --"), error
        assert files_under(root) == []


@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_a_path_setting_that_names_a_file_or_a_folder_inside_one_is_refused(tmp_path, below):
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    for key in PATH_KEYS:
        value = str(afile / below) if below else str(afile)
        with pytest.raises(ConfigError) as error:
            RunConfig.from_run_config({key: value})
        assert str(error.value) == (f"invalid setting {key}={value!r}: must be a folder (or a path where one can be "
                                    f"made): {afile} is a file")
    assert afile.read_text() == "not a folder"


def test_numbers_beyond_float_range_and_overlong_experiment_names_are_refused():
    with pytest.raises(ConfigError, match="invalid setting lr=1000.*: must be a finite number"):
        RunConfig.from_run_config({"lr": 10 ** 400})
    with pytest.raises(ConfigError, match="at most 200 characters"):
        RunConfig.from_run_config({"experiment": "e" * 201})
