"""A node's worker process: runs the ClientApp's tasks with torch, the data and the store kept loaded.

    python -m qd_app.client.worker --address NAME --key-file PATH --watch PID [--idle-seconds S]

Started by :mod:`qd_app.client.remote` (see there). It serves one message at a time, as
the SuperNode sends them, and keeps the clients of its last runs
(:func:`~qd_app.client.run.kept_client`) so that a client's partition is loaded once per
run, not once per message. It exits when process ``--watch`` (the node's SuperExec) is gone,
after ``--idle-seconds`` without a message, or when asked to stop.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import traceback
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from ..errors import UserFacingError
from .remote import STOP, from_plain, to_plain
from .run import kept_client
from .tasks import run_task


class Worker:
    """Serves task requests from the node's ClientApps."""

    def __init__(self) -> None:
        self.last_message = time.monotonic()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one task; a failure comes back as its message, as a ClientApp would report it."""
        self.last_message = started = time.monotonic()
        try:
            client = kept_client(request["run-config"], request["node-config"])
            content = run_task(request["type"], client, from_plain(request["content"]))
            print(f"{time.strftime('%H:%M:%S')} {request['type']}: {time.monotonic() - started:.2f} s", flush=True)
            return {"ok": True, "content": to_plain(content)}
        except UserFacingError as exc:
            return {"ok": False, "user-facing": True, "error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # pylint: disable=broad-exception-caught  (reported to the ClientApp)
            return {"ok": False, "user-facing": False, "error": type(exc).__name__,
                    "message": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"}


def serve(address: str, key: bytes, watch: int, idle_seconds: float) -> None:
    """Accept task requests until told to stop, the watched process is gone, or no message came
    for ``idle_seconds``."""
    worker = Worker()

    def guard() -> None:
        while True:
            time.sleep(1.0)
            if not _running(watch) or time.monotonic() - worker.last_message > idle_seconds:
                os._exit(0)  # the listener blocks in accept(): leave without waiting for it

    threading.Thread(target=guard, daemon=True).start()
    with Listener(address, family="AF_UNIX", authkey=key) as listener:
        while True:
            try:
                connection = listener.accept()
            except (OSError, EOFError):  # a client that failed authentication
                continue
            with connection:
                try:
                    request = connection.recv()
                except EOFError:  # the ClientApp went away before asking
                    continue
                if request == STOP:
                    return
                connection.send(worker.handle(request))


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (an exited one that nobody reaped yet does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "Z")
    return state not in ("Z", "X")


def main(argv: list[str] | None = None) -> None:
    """Start serving (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m qd_app.client.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="abstract socket name (without the leading NUL)")
    parser.add_argument("--key-file", required=True, type=Path)
    parser.add_argument("--watch", required=True, type=int, help="stop when this process is gone")
    parser.add_argument("--idle-seconds", type=float, default=1800.0)
    args = parser.parse_args(argv)
    serve("\0" + args.address, args.key_file.read_bytes(), args.watch, args.idle_seconds)


if __name__ == "__main__":
    main()
