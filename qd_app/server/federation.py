"""Who is in the federation: nodes, the partitions they hold and their class counts.

Before any stage runs, the server asks every connected node for its inventory (a
``query`` message) and waits until every partition ``0 .. num-partitions - 1`` is
held by exactly one node. Stages use the result to pick participants (for example
the node holding a client to forget). The exchange also brings every ClientApp up,
so the timed stages that follow do not include the federation's start-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
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
    """The clients of a run, by node id."""

    clients: dict[int, ClientInfo]

    @property
    def node_ids(self) -> list[int]:
        """Node ids ordered by partition id."""
        return [info.node_id for info in sorted(self.clients.values(), key=lambda c: c.partition_id)]

    @property
    def num_partitions(self) -> int:
        """Number of clients (partitions) in the federation."""
        return len(self.clients)

    def node_of(self, partition_id: int) -> int:
        """The node holding a partition."""
        for info in self.clients.values():
            if info.partition_id == partition_id:
                return info.node_id
        raise KeyError(partition_id)

    def partition_of(self, node_id: int) -> int:
        """The partition a node holds."""
        return self.clients[node_id].partition_id

    def nodes_where(self, keep: Callable[[ClientInfo], bool]) -> list[int]:
        """Node ids (by partition) of the clients for which ``keep`` holds."""
        return [node for node in self.node_ids if keep(self.clients[node])]


def discover_federation(grid: Grid, timeout_s: float = NODE_WAIT_TIMEOUT_S) -> Federation:
    """Query every node until all partitions are present; see the module docstring.

    Raises
    ------
    FederationError
        If a node fails the query (its reason is included), nodes disagree on
        ``num-partitions``, two nodes claim one partition, or not all partitions
        connect within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    clients: dict[int, ClientInfo] = {}
    expected: int | None = None
    last_report = 0.0
    while expected is None or len(clients) < expected:
        new_nodes = [node for node in grid.get_node_ids() if node not in clients]
        if new_nodes:
            for info in _query(grid, new_nodes):
                clients[info.node_id] = info
            expected = _check_consistent(clients.values())
            continue
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(clients)} of {expected or '?'} partitions connected within "
                f"{timeout_s:.0f} s: start one SuperNode per partition"
            )
        if time.monotonic() - last_report > 10:
            log(INFO, "Waiting for nodes: %s of %s partitions connected", len(clients), expected or "?")
            last_report = time.monotonic()
        time.sleep(POLL_INTERVAL_S)
    federation = Federation(clients)
    log(
        INFO,
        "Federation: %s clients, samples per client %s",
        federation.num_partitions,
        [federation.clients[node].num_examples for node in federation.node_ids],
    )
    return federation


def _query(grid: Grid, node_ids: list[int]) -> list[ClientInfo]:
    messages = [
        Message(RecordDict({protocol.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=protocol.QUERY)
        for node in node_ids
    ]
    infos = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise FederationError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
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
