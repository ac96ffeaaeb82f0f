"""End to end: the real `flwr run` against a SuperLink in simulation mode (Ray).

The test starts its own SuperLink on a free port (its PID is known, so it and every
process it spawns are stopped afterwards) and uses a scratch FLWR_HOME.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr, flower-superlink and flwr-simulation live beside python
RUN_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SimulationSuperLink:
    """A `flower-superlink --simulation` of our own, and the `flwr` CLI pointed at it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "RAY_TMPDIR": str(self.ray_tmp),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        command = [
            str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(home / "state.db"), "--disable-runtime-dependency-installation",
        ]
        self.log = open(home / "superlink.log", "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise RuntimeError((self.home / "superlink.log").read_text())
            time.sleep(0.5)
        raise TimeoutError("SuperLink did not start")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=PROJECT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def run_app(self, run_config: str, num_supernodes: int) -> tuple[dict, str]:
        """`flwr run . --stream`; returns the run's `flwr ls` entry and the streamed log."""
        started = self.flwr(
            "run", ".", "e2e", "--stream",
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
            "--run-config", run_config,
            timeout=RUN_TIMEOUT_S,
        )
        output = started.stdout + started.stderr
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, output
        listing = self.flwr("ls", "e2e", "--run-id", match.group(1), "--format", "json")
        [run] = json.loads(listing.stdout)["runs"]
        return run, output

    def stop(self) -> None:
        """Stop the SuperLink and everything it started (its whole process group)."""
        group = self.process.pid
        for sig, grace_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if not _group_alive(group):
                break
            os.killpg(group, sig)
            deadline = time.monotonic() + grace_s
            while _group_alive(group) and time.monotonic() < deadline:
                self.process.poll()  # reap the SuperLink itself
                time.sleep(0.2)
        self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = SimulationSuperLink(tmp_path_factory.mktemp("flwrhome"))
    yield link
    link.stop()


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
