"""``flower-superexec`` whose ClientApp processes start warm.

    python -m qd_app.deploy.superexec [flower-superexec options]

Flower 1.41's SuperExec starts a new ``flwr-clientapp`` process for every message a node
receives; about a second of each goes to starting Python and importing Flower, on every
message of every round. This launcher runs Flower's own SuperExec, but before it connects
anywhere it forks a *zygote*: a process that has imported the ClientApp runner once and
then, for each launch the SuperExec asks for, forks a child that runs Flower's
``flwr-clientapp`` entry point with the same arguments. The child is a fresh process
(its own connection, FAB install and app import, exactly as Flower's), started without
the imports; it asks its SuperNode again for a message object not there yet after
:data:`~qd_app.deploy.supernode.PULL_BACKOFF_S` instead of Flower's 1 s. If the zygote is gone, launches fall back to Flower's own
``subprocess.Popen``. The zygote ends when the SuperExec does (its pipe closes).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import SimpleNamespace

from .supernode import PULL_BACKOFF_S


class Zygote:
    """The SuperExec's end of the zygote: send it the argument lists of ClientApp launches."""

    def __init__(self, pipe: int, pid: int) -> None:
        self._pipe = pipe
        self.pid = pid
        self._lock = threading.Lock()

    @classmethod
    def start(cls, entry_point: Callable[[], None] | None = None) -> Zygote:
        """Fork the zygote; call before any connection or thread exists in this process.

        ``entry_point`` is what each child runs (default: Flower's ``flwr-clientapp``)."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the zygote
            os.close(write)
            code = 0
            try:
                serve(read, entry_point or client_app_entry_point())
            except BaseException:  # pylint: disable=broad-exception-caught
                code = 1
            os._exit(code)  # pylint: disable=protected-access
        os.close(read)
        return cls(write, pid)

    def close(self) -> None:
        """Close the pipe: the zygote ends (children already started run on)."""
        os.close(self._pipe)

    def popen(self, args: list[str], stdout=None, stderr=None):
        """Stand-in for ``subprocess.Popen`` in Flower's SubprocessExecutor (which ignores the result)."""
        request = json.dumps({"argv": list(args), "quiet": stdout == subprocess.DEVNULL}).encode() + b"\n"
        with self._lock:
            try:
                os.write(self._pipe, request)
                return None
            except OSError:  # the zygote is gone: start the process the usual way
                return subprocess.Popen(args, stdout=stdout, stderr=stderr)  # pylint: disable=consider-using-with


def client_app_entry_point() -> Callable[[], None]:
    """Flower's ``flwr-clientapp`` main, imported, with the shorter first wait for an object."""
    from flwr.supernode.cli import flwr_clientapp  # pylint: disable=import-outside-toplevel
    from flwr.supernode.runtime import run_clientapp  # pylint: disable=import-outside-toplevel

    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        run_clientapp.pull_and_inflate_object_from_tree, initial_backoff=PULL_BACKOFF_S)
    return flwr_clientapp


def serve(pipe: int, entry_point: Callable[[], None]) -> None:
    """The zygote's loop: fork a child running ``entry_point`` per request; end at EOF."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the system
    with os.fdopen(pipe, "rb") as requests:
        for line in requests:
            request = json.loads(line)
            if os.fork() == 0:
                run_client_app(entry_point, request["argv"], request["quiet"])


def run_client_app(entry_point, argv: list[str], quiet: bool) -> None:
    """In a forked child: become ``flwr-clientapp argv[1:]`` and exit with its code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 1
    try:
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        sys.argv = ["flwr-clientapp", *argv[1:]]
        entry_point()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access


def main() -> None:
    """Start the zygote, then Flower's SuperExec with launches going through it."""
    zygote = Zygote.start()
    from flwr.supercore.cli.flower_superexec import flower_superexec  # pylint: disable=import-outside-toplevel
    from flwr.supercore.superexec.executor import subprocess_executor  # pylint: disable=import-outside-toplevel

    subprocess_executor.subprocess = SimpleNamespace(Popen=zygote.popen, DEVNULL=subprocess.DEVNULL)
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
