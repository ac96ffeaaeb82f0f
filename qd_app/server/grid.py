"""The Grid of a real federation, made fit for short rounds.

Flower 1.41's deployment Grid looks for replies every 3 s, and sends every array of a
message as an object of its own (one HTTP exchange each): a round of a second's work
took several seconds. :class:`DeploymentGrid` looks for replies every 0.1 s and sends
each ArrayRecord packed into one array (:func:`qd_app.protocol.pack_arrays`); the
ClientApp answers in kind, and replies are unpacked as they arrive, so strategies see
ordinary records. A reply is listed before all its objects have reached the SuperLink;
Flower's Grid then waits 1 s before asking again, this process's Grid 0.05 s (doubling
from there, as Flower's). In simulation, Flower's in-memory Grid looks for replies every
0.1 s; :func:`for_short_rounds` makes that 0.01 s (a read of the in-memory state).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import HttpGrid, InMemoryGrid, http_grid

from .. import protocol

REPLY_POLL_INTERVAL_S = 0.1
SIMULATION_POLL_INTERVAL_S = 0.01
OBJECT_PULL_BACKOFF_S = 0.05
PLAIN_GRID = "QD_APP_FLOWER_GRID"  # set (by `qd-app federation up --plain`): Flower's Grid as it is, a baseline


class DeploymentGrid(Grid):
    """Wraps a Grid: packed arrays out, unpacked replies in, replies pulled every ``interval`` seconds."""

    def __init__(self, grid: Grid, interval: float = REPLY_POLL_INTERVAL_S) -> None:
        self.grid = grid
        self.interval = interval

    def set_run(self, run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push the messages with their arrays packed."""
        messages = list(messages)
        for message in messages:
            message.content = protocol.pack_arrays(message.content)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies, their arrays unpacked."""
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if reply.has_content():
                reply.content = protocol.unpack_arrays(reply.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all have come or ``timeout`` passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if waiting:
                time.sleep(self.interval)
        return replies


def for_short_rounds(grid: Grid) -> Grid:
    """The deployment Grid wrapped in :class:`DeploymentGrid`, the simulation's Grid polling
    every ``SIMULATION_POLL_INTERVAL_S``; with ``QD_APP_FLOWER_GRID`` set in the SuperLink's
    environment, or any other Grid, the Grid as it is."""
    if os.environ.get(PLAIN_GRID):
        return grid
    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = SIMULATION_POLL_INTERVAL_S
        return grid
    if not isinstance(grid, HttpGrid):
        return grid
    http_grid.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=OBJECT_PULL_BACKOFF_S)
    return DeploymentGrid(grid)
