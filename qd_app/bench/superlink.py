"""Run this app with the real ``flwr run`` against a private simulation SuperLink.

Used by the benchmark and the end-to-end tests: the SuperLink gets a free port and a
scratch ``FLWR_HOME`` (so a user's own local SuperLink is never touched), and
:meth:`SimulationSuperLink.stop` ends it and every process it started (Ray
included) through its process group.
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

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # flwr, flower-superlink and flwr-simulation live beside python
OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` of our own, and the ``flwr`` CLI pointed at it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are limited
        self.env = {
            **os.environ,
            **OFFLINE_ENVIRONMENT,
            "FLWR_HOME": str(home),
            "RAY_TMPDIR": str(self.ray_tmp),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "private"\n\n[superlink.private]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        command = [
            str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
            "--port", str(self.port), "--database", str(home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        self.log = open(home / "superlink.log", "wb")  # pylint: disable=consider-using-with  (closed in stop)
        self.process = subprocess.Popen(  # pylint: disable=consider-using-with
            command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
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
        raise TimeoutError("the SuperLink did not start within 60 s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI in the project folder against this SuperLink."""
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=PROJECT, env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def run_app(self, run_config: str, num_supernodes: int, timeout: float = 3600) -> tuple[dict, str]:
        """``flwr run . --stream``; returns the run's ``flwr ls`` entry and the streamed log."""
        started = self.flwr(
            "run", ".", "private", "--stream",
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
            "--run-config", run_config,
            timeout=timeout,
        )
        output = started.stdout + started.stderr
        match = re.search(r"Successfully started run (\d+)", output)
        if not match:
            raise RuntimeError(f"flwr run did not start:\n{output[-2000:]}")
        listing = self.flwr("ls", "private", "--run-id", match.group(1), "--format", "json")
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

    def __enter__(self) -> SimulationSuperLink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
