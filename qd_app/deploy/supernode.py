"""``flower-supernode`` that looks for messages more often.

    python -m qd_app.deploy.supernode [flower-supernode options]

Flower 1.41's SuperNode waits 3 s after every empty look for a message, and 0.5 s
between looks for its ClientApp's reply; no option or variable changes either
(``flwr/supernode/start_client_internal.py``). On a federation whose rounds take a
second of work, that wait is most of a round. This launcher runs Flower's own SuperNode
with every such wait capped at :data:`POLL_INTERVAL_S`, by giving that module a clock
whose ``sleep`` is capped; everything else is Flower's. Flower is pinned to the version
this was written against, and a test checks that the waits are where this expects them.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

POLL_INTERVAL_S = 0.25


def capped_clock(cap: float) -> SimpleNamespace:
    """The ``time`` module, with ``sleep`` never longer than ``cap`` seconds."""
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = lambda seconds: time.sleep(min(seconds, cap))
    return clock


def main() -> None:
    """Start Flower's SuperNode with the shorter waits."""
    from flwr.supernode import start_client_internal  # pylint: disable=import-outside-toplevel
    from flwr.supernode.cli import flower_supernode  # pylint: disable=import-outside-toplevel

    start_client_internal.time = capped_clock(POLL_INTERVAL_S)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
