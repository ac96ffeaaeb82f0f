"""Where the benchmark runs the app with the real ``flwr run``: a private simulation SuperLink, or a
real federation on this machine (``qd-app federation up``).

Both get a scratch ``FLWR_HOME`` (so a user's own connections are never touched), and
stopping ends every process they started (Ray, SuperExecs and node workers included).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from ..deploy.federation import LocalFederation
from ..deploy.processes import BIN, PROJECT, Process, free_ports, run_app, start, stop, wait_for_port

__all__ = ["PROJECT", "DeploymentLink", "Link", "SimulationSuperLink"]


class Link(Protocol):
    """What the benchmark runs the app through."""

    def run_app(self, run_config: str, num_supernodes: int, timeout: float = 3600) -> tuple[dict, str]:
        """``flwr run``; returns the run's ``flwr ls`` entry and its log."""


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` of our own, whose runs join a Ray head of our own, and
    ``flwr run <app>`` pointed at it."""

    def __init__(self, home: Path, app: Path = PROJECT) -> None:
        self.home = home
        self.app = app
        self.port, ray_port = free_ports(2)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are limited
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "private"\n\n[superlink.private]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        environment = {"FLWR_HOME": str(home), "RAY_TMPDIR": str(self.ray_tmp),
                       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.processes: list[Process] = []
        try:
            # a Ray head of our own that every run's simulation joins (Flower's multi-node mode):
            # Ray starts once, not once per run
            ray_command = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(ray_port),
                           "--node-ip-address", "127.0.0.1", "--num-cpus", str(os.cpu_count() or 1),
                           "--include-dashboard=false", "--disable-usage-stats"]
            self._start(ray_command, environment, home / "ray.log", ray_port)
            command = [
                str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
                "--port", str(self.port), "--database", str(home / "state.db"),
                "--disable-runtime-dependency-installation",
            ]
            self._start(command, {**environment, "RAY_ADDRESS": f"127.0.0.1:{ray_port}"}, home / "superlink.log",
                        self.port)
        except BaseException:
            self.stop()
            raise

    def _start(self, command: list[str], environment: dict[str, str], log: Path, port: int) -> None:
        popen, process = start(command, environment, log)
        self.processes.append(process)
        wait_for_port(port, popen, log)

    def run_app(self, run_config: str, num_supernodes: int, timeout: float = 3600) -> tuple[dict, str]:
        """``flwr run . --stream`` with ``num_supernodes`` simulated clients; returns the run's
        ``flwr ls`` entry and the streamed log."""
        return run_app("private", run_config, self.home, timeout=timeout, app=self.app,
                       federation_config=f"num-supernodes={num_supernodes} client-resources-num-cpus=1")

    def stop(self) -> None:
        """Stop the SuperLink, the Ray head and everything they started."""
        stop(self.processes[::-1], grace_s=30)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> SimulationSuperLink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class DeploymentLink:
    """A federation of ``nodes`` SuperNodes on this machine under ``folder`` (``plain``: Flower's own
    SuperNode and Grid, as a baseline for the per-message cost), and ``flwr run`` against it."""

    NAME = "qd-bench"

    def __init__(self, folder: Path, nodes: int, plain: bool = False, app: Path = PROJECT) -> None:
        self.app = app
        self.home = folder / "flwrhome"
        self.home.mkdir(parents=True, exist_ok=True)
        self.previous_home = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.home)  # where `up` registers the connection
        self.federation = LocalFederation(folder / "federation")
        self.nodes = nodes
        try:
            self.federation.up(nodes, self.NAME, plain=plain)
        except BaseException:
            self.stop()
            raise

    def run_app(self, run_config: str, num_supernodes: int, timeout: float = 3600) -> tuple[dict, str]:
        """``flwr run . --stream`` on the federation (it has ``num_supernodes`` nodes)."""
        assert num_supernodes == self.nodes, f"the federation has {self.nodes} nodes, not {num_supernodes}"
        return run_app(self.NAME, run_config, self.home, timeout=timeout, app=self.app)

    def stop(self) -> None:
        """Stop every process of the federation."""
        if self.federation.load() is not None:
            self.federation.down()
        if self.previous_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = self.previous_home

    def __enter__(self) -> DeploymentLink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
