"""Processes on this machine: start a Flower daemon in its own session, know it again, stop it with
everything it started; run the ``flwr`` CLI.

A process is recorded with its PID and its start time (from ``/proc``), so a PID that
the system has given to another process since is never mistaken for ours. Stopping
collects the process's descendants first (Flower's SuperExec and ClientApp children),
sends SIGTERM to all of them, and SIGKILL to whatever is left after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # flwr, flower-superlink and flower-supernode live beside python
PROJECT = Path(__file__).resolve().parents[2]  # the app's folder: what `flwr run .` runs
OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass(frozen=True)
class Process:
    """A process we started: its PID and its start time (clock ticks after boot)."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Process:
        """The process running now under ``pid``."""
        return cls(pid, start_time(pid) or 0)

    def alive(self) -> bool:
        """Whether this very process still runs (not a zombie, not a reused PID)."""
        return start_time(self.pid) == self.started and _state(self.pid) not in ("Z", "X", None)

    def as_dict(self) -> dict[str, int]:
        """JSON form."""
        return {"pid": self.pid, "started": self.started}


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (None: there is none)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _state(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[0] if fields else None


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (field 3 on)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree, and every other member of its process
    group when it leads one (a child whose parent exited is no longer below it, but stays
    in the group: e.g. a node's worker started by a ClientApp that is gone)."""
    children: dict[int, list[int]] = {}
    group: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            if int(fields[2]) == pid and int(entry.name) != pid:
                group.append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found + [member for member in group if member not in found]


def start(command: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Process]:
    """Start ``command`` in a session of its own, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen(  # pylint: disable=consider-using-with  (a daemon: it outlives this call)
            command, env={**os.environ, **OFFLINE_ENVIRONMENT, **env}, stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return process, Process.of(process.pid)


def stop(processes: list[Process], grace_s: float = 15.0) -> list[int]:
    """Stop the processes that still run and everything they started; returns the PIDs signalled."""
    targets = [p for p in processes if p.alive()]
    pids = [p.pid for p in targets] + [child for p in targets for child in descendants(p.pid)]
    tree = [Process.of(pid) for pid in dict.fromkeys(pids)]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for process in tree:
            if process.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)
        deadline = time.monotonic() + wait_s
        while any(p.alive() for p in tree) and time.monotonic() < deadline:
            _reap(tree)
            time.sleep(0.1)
    _reap(tree)
    return [p.pid for p in tree]


def _reap(processes: list[Process]) -> None:
    """Collect those of ``processes`` that are our own exited children (else they linger as
    zombies, and a zombie SuperNode keeps its SuperExec waiting for it)."""
    for process in processes:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(process.pid, os.WNOHANG)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (a port a stopped server left in TIME_WAIT is free,
    as it is to the servers, which bind with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the system has free now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 60.0,
                  host: str = "127.0.0.1") -> None:
    """Wait until ``process`` listens on ``port``; raise with its log's end if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{tail(log)}")
        time.sleep(0.2)
    raise TimeoutError(f"{process.args[0]} did not listen on port {port} within {timeout_s:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 15) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def flwr(args: list[str], flwr_home: Path, timeout: float = 120, app: Path = PROJECT) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI in the app's folder with its connections in ``flwr_home``."""
    env = {**os.environ, **OFFLINE_ENVIRONMENT, "FLWR_HOME": str(flwr_home),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "flwr"), *args], cwd=app, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def staged_app(folder: Path) -> Path:
    """The app's own files, ``pyproject.toml`` and what its ``fab-include`` names, copied into a
    fresh ``folder``, for ``flwr run`` to run from there.

    ``flwr run .`` walks every file under the app's folder before it filters them, a
    virtual environment inside the project included (seconds per run); a staged copy has
    only the app's files, and edits to the working tree do not reach runs already planned.
    """
    shutil.rmtree(folder, ignore_errors=True)
    patterns = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    names = ["pyproject.toml", *(path.relative_to(PROJECT) for pattern in patterns for path in PROJECT.glob(pattern))]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, folder / name)
    return folder


def run_app(connection: str, run_config: str, flwr_home: Path, federation_config: str | None = None,
            timeout: float = 3600, app: Path = PROJECT) -> tuple[dict, str]:
    """``flwr run <app> <connection> --stream``; returns the run's ``flwr ls`` entry (its final
    status: ``flwr run`` exits 0 even when the run failed) and the streamed log."""
    args = ["run", ".", connection, "--stream", "--run-config", run_config]
    if federation_config:
        args += ["--federation-config", federation_config]
    started = flwr(args, flwr_home, timeout=timeout, app=app)
    output = started.stdout + started.stderr
    match = re.search(r"Successfully started run (\d+)", output)
    if not match:
        raise RuntimeError(f"flwr run did not start:\n{output[-2000:]}")
    listing = flwr(["ls", connection, "--run-id", match.group(1), "--format", "json"], flwr_home)
    [run] = json.loads(listing.stdout)["runs"]
    return run, output
