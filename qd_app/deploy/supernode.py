"""``flower-supernode`` that looks for messages more often.

    python -m qd_app.deploy.supernode [flower-supernode options]

Flower 1.41's SuperNode waits 3 s after every empty look for a message, and 0.5 s
between looks for its ClientApp's reply; no option or variable changes either
(``flwr/supernode/start_client_internal.py``). On a federation whose rounds take a
second of work, that wait is most of a round; so is the 1 s Flower waits before it
asks the SuperLink again for a message's object that has not arrived there yet. This launcher runs Flower's own SuperNode
with every such wait capped at :data:`POLL_INTERVAL_S`, by giving that module a clock
whose ``sleep`` is capped, and the first wait for an object at :data:`PULL_BACKOFF_S`
(doubling from there, as Flower's); everything else is Flower's. Flower is pinned to the version
this was written against, and a test checks that the waits are where this expects them.

The SuperExec it starts is :mod:`qd_app.deploy.superexec` (Flower's, with warm ClientApp
starts) instead of the ``flower-superexec`` command.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from types import SimpleNamespace

POLL_INTERVAL_S = 0.25
PULL_BACKOFF_S = 0.05  # first wait before asking again for an object not there yet (Flower: 1 s, doubling)


def capped_clock(cap: float) -> SimpleNamespace:
    """The ``time`` module, with ``sleep`` never longer than ``cap`` seconds."""
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = lambda seconds: time.sleep(min(seconds, cap))
    return clock


def warm_superexec_popen(command: list[str], *args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` that starts :mod:`qd_app.deploy.superexec` where Flower asks for ``flower-superexec``."""
    if command and command[0] == "flower-superexec":
        command = [sys.executable, "-m", "qd_app.deploy.superexec", *command[1:]]
    return subprocess.Popen(command, *args, **kwargs)  # pylint: disable=consider-using-with


def main() -> None:
    """Start Flower's SuperNode with the shorter waits."""
    from flwr.supernode import start_client_internal  # pylint: disable=import-outside-toplevel
    from flwr.supernode.cli import flower_supernode  # pylint: disable=import-outside-toplevel

    start_client_internal.time = capped_clock(POLL_INTERVAL_S)
    start_client_internal.subprocess = SimpleNamespace(Popen=warm_superexec_popen)
    start_client_internal.pull_objects = functools.partial(start_client_internal.pull_objects,
                                                           initial_backoff=PULL_BACKOFF_S)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
