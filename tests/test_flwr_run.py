"""End to end: the real `flwr run` against a SuperLink in simulation mode (Ray).

The test starts its own SuperLink on a free port (its PID is known, so it and every
process it spawns are stopped afterwards) and uses a scratch FLWR_HOME.
"""

from __future__ import annotations

import json

import pytest

from qd_app.bench.superlink import SimulationSuperLink


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    with SimulationSuperLink(tmp_path_factory.mktemp("flwrhome")) as link:
        yield link


def test_flwr_run_trains_unlearns_and_serves_a_later_request_on_real_mnist(superlink, tmp_path):
    data_dir, output_dir, store_dir = tmp_path / "data", tmp_path / "out", tmp_path / "stores"
    paths = f"data-dir='{data_dir}' output-dir='{output_dir}' store-dir='{store_dir}' experiment='e2e'"
    run, log = superlink.run_app(f"{paths} num-server-rounds=2 local-steps=5", num_supernodes=3)
    assert run["status"] == "finished:completed", log
    results = json.loads((output_dir / "e2e" / "results.json").read_text())
    assert results["federation"]["num-partitions"] == 3
    assert sum(map(sum, results["federation"]["class-counts"])) == 60_000  # the real MNIST training split
    assert [s["name"] for s in results["stages"]] == ["train", "unlearn", "recover", "relearn"]
    assert results["stages"][0]["rounds"] == 2
    assert results["requests"][0]["label"] == "class 9"
    assert (output_dir / "e2e" / "model.pt").exists() and (output_dir / "e2e" / "class_accuracy.png").exists()
    assert len(list((store_dir / "e2e").glob("partition-*.qdstore"))) == 3
    assert "[train] round 2: test accuracy" in log and "Served: unlearn class 9" in log

    run, log = superlink.run_app(f"{paths} phase='unlearn' forget-class='4'", num_supernodes=3)
    assert run["status"] == "finished:completed", log
    results = json.loads((output_dir / "e2e" / "results.json").read_text())
    assert [r["phase"] for r in results["runs"]] == ["all", "unlearn"]
    assert results["requests"][-1]["label"] == "class 4" and results["requests"][-1]["run"] == 1


def test_flwr_run_with_a_bad_setting_fails_with_one_clear_message(superlink, tmp_path):
    run, log = superlink.run_app(f"output-dir='{tmp_path}' alpha=-0.5", num_supernodes=2)
    assert run["status"] == "finished:failed"
    assert "invalid setting alpha=-0.5: must be > 0" in run["status-details"]
    assert "invalid setting alpha=-0.5: must be > 0" in log
    assert not any(tmp_path.iterdir())
