"""Planning a run's requests: what to serve, who takes part, and what to refuse (pure functions).

Everything here works on the :class:`~qd_app.server.federation.Federation` inventory
and the :class:`~qd_app.request.Forgotten` state, so a bad request is refused
before any stage runs and nothing on disk changes. No Grid is needed: tests build a
Federation by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from .. import protocol
from ..errors import RequestError
from ..request import NOTHING_FORGOTTEN, RELEARN, UNLEARN, Forgotten, UnlearningRequest
from .federation import ClientInfo, Federation

Plan = list[tuple[str, UnlearningRequest]]


def plan_requests(
    phase: str, requests: list[UnlearningRequest], relearn_rounds: int,
    latest_in_force: Callable[[], UnlearningRequest | None],
) -> Plan:
    """The (action, request) pairs a run of ``phase`` serves, in order.

    ``all`` unlearns every request and relearns the last one (when ``relearn_rounds``
    > 0); ``train`` serves nothing; ``unlearn`` needs a request; ``relearn`` relearns the
    requests named, or else the latest request still in force (``latest_in_force()``).
    """
    if phase == "train":
        return []
    if phase == "all":
        plan = [(UNLEARN, request) for request in requests]
        return plan + [(RELEARN, requests[-1])] if requests and relearn_rounds > 0 else plan
    if phase == "unlearn":
        if not requests:
            raise RequestError("phase=unlearn needs a request: set forget-class or forget-client")
        return [(UNLEARN, request) for request in requests]
    if relearn_rounds == 0:
        raise RequestError("phase=relearn with relearn-rounds=0 would relearn nothing: set relearn-rounds >= 1")
    if requests:
        return [(RELEARN, request) for request in requests]
    latest = latest_in_force()
    if latest is None:
        raise RequestError("phase=relearn: nothing is forgotten, so there is nothing to relearn")
    return [(RELEARN, latest)]


def check_client_ids(requests: list[UnlearningRequest], federation: Federation, setting: str) -> None:
    """Refuse a client request naming a partition the federation does not have."""
    size = federation.num_partitions
    for request in requests:
        bad = [t for t in request.targets if request.kind == "client" and t >= size]
        if bad:
            raise RequestError(
                f"invalid setting forget-client={setting!r}: client {bad[0]} does not exist "
                f"(the federation has clients 0-{size - 1})"
            )


def check_request(action: str, request: UnlearningRequest, state: Forgotten, federation: Federation) -> None:
    """Refuse unlearning what is already forgotten (or held by no remaining client), and
    relearning what is not forgotten."""
    if action == UNLEARN:
        already = state.holds(request)
        if already:
            raise RequestError(
                f"{request.label}: {request.kind} {sorted(already)[0]} is already forgotten (relearn it first)"
            )
        if request.kind == "class" and not federation.missing and not holders(federation, request.targets, state):
            raise RequestError(f"{request.label}: no remaining client holds data of it")
    elif state.holds(request) != set(request.targets):
        missing = sorted(set(request.targets) - state.holds(request))
        raise RequestError(f"cannot relearn {request.label}: {request.kind} {missing[0]} is not forgotten")


def check_stores(federation: Federation, nodes: set[int]) -> None:
    """Refuse when a participant's synthetic store is missing or unusable."""
    problems = [
        f"partition {info.partition_id}: {info.store_status}"
        for info in (federation.clients[node] for node in sorted(nodes))
        if info.store_status != protocol.STORE_STATUS_OK
    ]
    if problems:
        raise RequestError("the synthetic stores needed to serve the request are not usable: " + "; ".join(problems))


# ------------------------------------------------------------------ participants
# ``among``: the partitions that may take part (None: every one); a method that draws on the
# clients' stores passes those that trained the current model, as only they hold one.
Among = Collection[int] | None


def holders(federation: Federation, classes: tuple[int, ...], state: Forgotten, among: Among = None) -> list[int]:
    """Nodes of clients not forgotten that hold data of any of ``classes``."""
    return federation.nodes_where(
        lambda c: _may(c, state, among) and any(c.class_counts[k] for k in classes)
    )


def training_participants(federation: Federation, state: Forgotten, among: Among = None) -> list[int]:
    """Nodes of clients not forgotten that hold data of a class not forgotten."""

    def has_data(client: ClientInfo) -> bool:
        return any(n for c, n in enumerate(client.class_counts) if c not in state.classes)

    return federation.nodes_where(lambda c: _may(c, state, among) and has_data(c))


def unlearn_participants(federation: Federation, request: UnlearningRequest, state: Forgotten,
                         among: Among = None) -> list[int]:
    """Nodes that unlearn: the holders of the classes, or the clients to forget."""
    if request.kind == "class":
        return holders(federation, request.targets, state, among)
    return [federation.node_of(target) for target in request.targets if _among(target, among)]


def stage_participants(federation: Federation, action: str, request: UnlearningRequest, state: Forgotten,
                       among: Among = None) -> list[int]:
    """Every node that takes part in serving ``request`` from ``state`` (unlearning and recovery,
    or relearning)."""
    after = training_participants(federation, state.after(action, request), among)
    return unlearn_participants(federation, request, state, among) + after if action == UNLEARN else after


def _may(client: ClientInfo, state: Forgotten, among: Among) -> bool:
    return client.partition_id not in state.clients and _among(client.partition_id, among)


def _among(partition: int, among: Among) -> bool:
    return among is None or partition in among


def walk(plan: Plan, state: Forgotten = NOTHING_FORGOTTEN) -> list[tuple[str, UnlearningRequest, Forgotten]]:
    """Each step of ``plan`` with the state it starts from."""
    steps = []
    for action, request in plan:
        steps.append((action, request, state))
        state = state.after(action, request)
    return steps
