"""Run this app with the real ``flwr run`` against a private simulation SuperLink.

Used by the benchmark and the end-to-end tests: the SuperLink gets a free port and a
scratch ``FLWR_HOME`` (so a user's own local SuperLink is never touched), and
:meth:`SimulationSuperLink.stop` ends it and every process it started (Ray included).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..deploy.processes import BIN, PROJECT, free_ports, run_app, start, stop, wait_for_port

__all__ = ["PROJECT", "SimulationSuperLink"]


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` of our own, and ``flwr run`` pointed at it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        [self.port] = free_ports(1)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are limited
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
        log = home / "superlink.log"
        environment = {"FLWR_HOME": str(home), "RAY_TMPDIR": str(self.ray_tmp),
                       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        popen, self.process = start(command, environment, log)
        try:
            wait_for_port(self.port, popen, log)
        except BaseException:
            self.stop()
            raise

    def run_app(self, run_config: str, num_supernodes: int, timeout: float = 3600) -> tuple[dict, str]:
        """``flwr run . --stream`` with ``num_supernodes`` simulated clients; returns the run's
        ``flwr ls`` entry and the streamed log."""
        return run_app("private", run_config, self.home, timeout=timeout,
                       federation_config=f"num-supernodes={num_supernodes} client-resources-num-cpus=1")

    def stop(self) -> None:
        """Stop the SuperLink and everything it started."""
        stop([self.process], grace_s=30)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> SimulationSuperLink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
