"""Who is in the federation: nodes, the partitions they hold and their class counts.

Before any stage runs, the server asks every connected node for its inventory (a
``query`` message) and waits until every partition ``0 .. num-partitions - 1`` is
held by exactly one node. Stages use the result to pick participants (for example
the node holding a client to forget). The exchange also brings every ClientApp up,
so the timed stages that follow do not include the federation's start-up. A run
that contacts no client (server-only unlearning) takes the federation from the
training record instead and asks nobody.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from .. import protocol
from ..errors import FederationError

NODE_WAIT_TIMEOUT_S = 600.0
POLL_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ClientInfo:
    """One node's answer to the inventory query."""

    node_id: int
    partition_id: int
    num_partitions: int
    class_counts: tuple[int, ...]
    store_status: str = protocol.STORE_STATUS_MISSING
    synthetic_counts: tuple[int, ...] = ()
    store_bytes: int = 0

    @property
    def num_examples(self) -> int:
        """Number of training samples the client holds."""
        return sum(self.class_counts)


@dataclass(frozen=True)
class Federation:
    """The clients of a run, by node id; ``expected``: the partitions the nodes say there are
    (0: as many as answered), of which some may be :attr:`missing`. ``connected`` is False for
    a federation known only from the training record (:func:`recorded_federation`)."""

    clients: dict[int, ClientInfo]
    expected: int = 0
    connected: bool = True

    @property
    def node_ids(self) -> list[int]:
        """Node ids ordered by partition id."""
        return [info.node_id for info in sorted(self.clients.values(), key=lambda c: c.partition_id)]

    @property
    def num_partitions(self) -> int:
        """Number of clients (partitions) in the federation, connected or not."""
        return self.expected or len(self.clients)

    @property
    def missing(self) -> list[int]:
        """Partitions no node holds in this run (they did not connect in time)."""
        present = {info.partition_id for info in self.clients.values()}
        return [partition for partition in range(self.num_partitions) if partition not in present]

    def node_of(self, partition_id: int) -> int:
        """The node holding a partition."""
        for info in self.clients.values():
            if info.partition_id == partition_id:
                return info.node_id
        raise KeyError(partition_id)

    def partition_of(self, node_id: int) -> int:
        """The partition a node holds."""
        return self.clients[node_id].partition_id

    def as_record(self) -> dict[str, Any]:
        """Partitions and class counts, as results.json records them (:func:`recorded_federation` reads it)."""
        return {"num-partitions": self.num_partitions,
                "class-counts": [list(self.clients[node].class_counts) for node in self.node_ids]}

    def nodes_where(self, keep: Callable[[ClientInfo], bool]) -> list[int]:
        """Node ids (by partition) of the clients for which ``keep`` holds."""
        return [node for node in self.node_ids if keep(self.clients[node])]


def discover_federation(grid: Grid, timeout_s: float = NODE_WAIT_TIMEOUT_S) -> Federation:
    """Query every node until all partitions are present, or ``timeout_s`` has passed: then the
    federation is what connected, with the rest :attr:`Federation.missing` (what needs them
    decides what to do); see the module docstring.

    Raises
    ------
    FederationError
        If a node's ClientApp fails the query (its reason is included), nodes disagree on
        ``num-partitions``, two nodes claim one partition, or no node answers within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    clients: dict[int, ClientInfo] = {}
    unanswered: set[int] = set()  # listed, but gone when asked
    expected: int | None = None
    last_report = 0.0
    while expected is None or len(clients) < expected:
        new_nodes = [node for node in grid.get_node_ids() if node not in clients and node not in unanswered]
        if new_nodes:
            for info in _query(grid, new_nodes):
                clients[info.node_id] = info
            unanswered.update(node for node in new_nodes if node not in clients)
            if clients:
                expected = _check_consistent(clients.values())
            continue
        if time.monotonic() > deadline:
            if not clients:
                raise FederationError(f"no node connected within {timeout_s:.0f} s: start one SuperNode per "
                                      "partition (node-wait-seconds sets how long the server waits)")
            break
        if time.monotonic() - last_report > 10:
            log(INFO, "Waiting for nodes: %s of %s partitions connected", len(clients), expected or "?")
            last_report = time.monotonic()
        time.sleep(POLL_INTERVAL_S)
    federation = Federation(clients, expected or 0)
    log(
        INFO,
        "Federation: %s clients, samples per client %s",
        federation.num_partitions,
        [federation.clients[node].num_examples for node in federation.node_ids],
    )
    if federation.missing:
        log(WARNING, "Partitions %s did not connect within %.0f s; what needs them waits for a later run",
            federation.missing, timeout_s)
    return federation


def recorded_federation(record: Mapping[str, Any]) -> Federation | None:
    """The federation as training recorded it in results.json (:meth:`Federation.as_record`), for
    a run that contacts no client; nobody is asked, and the node ids are the partition ids.
    None when the record has no federation."""
    counts = record.get("class-counts")
    if not counts:
        return None
    size = int(record["num-partitions"])
    clients = {partition: ClientInfo(partition, partition, size, tuple(int(c) for c in class_counts))
               for partition, class_counts in enumerate(counts)}
    return Federation(clients, size, connected=False)


def _query(grid: Grid, node_ids: list[int]) -> list[ClientInfo]:
    messages = [
        Message(RecordDict({protocol.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=protocol.QUERY)
        for node in node_ids
    ]
    infos = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
            raise FederationError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        if reply.has_error():  # the node went away since it was listed: it counts as not connected
            log(WARNING, "Node %s did not answer: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        answer = reply.content[protocol.INVENTORY]
        infos.append(
            ClientInfo(
                node_id=reply.metadata.src_node_id,
                partition_id=int(answer[protocol.PARTITION_ID]),
                num_partitions=int(answer[protocol.NUM_PARTITIONS]),
                class_counts=tuple(int(c) for c in answer[protocol.CLASS_COUNTS]),
                store_status=str(answer[protocol.STORE_STATUS]),
                synthetic_counts=tuple(int(c) for c in answer[protocol.SYNTHETIC_COUNTS]),
                store_bytes=int(answer[protocol.STORE_BYTES]),
            )
        )
    return infos


def _check_consistent(clients: Iterable[ClientInfo]) -> int:
    clients = list(clients)
    sizes = {info.num_partitions for info in clients}
    if len(sizes) != 1:
        raise FederationError(f"nodes disagree on num-partitions: {sorted(sizes)}")
    seen: dict[int, int] = {}
    for info in clients:
        if info.partition_id in seen:
            raise FederationError(
                f"nodes {seen[info.partition_id]} and {info.node_id} both hold partition-id {info.partition_id}"
            )
        seen[info.partition_id] = info.node_id
    return sizes.pop()
