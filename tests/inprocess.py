"""A Grid that delivers messages to a ClientApp in this process (no Ray, no SuperLink).

Flower's ``Message`` needs a task identity outside a real run; ``TaskIdentity`` is
internal API, which is why flwr is pinned.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from privacy import audit_reply

from qd_app.client_app import app as qd_app_client

RUN_ID = 7
SERVER_NODE_ID = 0
LEAKS: list[str] = []  # what audit_reply found in any reply (conftest fails the test that sent it)


def set_task_identity() -> None:
    """Let Messages be created outside a run."""
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1


def node_context(node_id: int, run_config: dict, node_config: dict) -> Context:
    """The Context a SuperNode would give its ClientApp."""
    return Context(
        run_id=RUN_ID, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config
    )


class InProcessGrid(Grid):
    """Calls the ClientApp synchronously for every message; keeps all traffic for inspection and
    audits every reply for anything but model parameters and small metrics (``tests/privacy.py``)."""

    def __init__(self, client_app: ClientApp, run_config: dict, num_partitions: int,
                 node_configs: list[dict] | None = None) -> None:
        set_task_identity()
        self.client_app = client_app
        configs = node_configs or [
            {"partition-id": index, "num-partitions": num_partitions} for index in range(num_partitions)
        ]
        self.contexts = {
            100 + index: node_context(100 + index, run_config, config) for index, config in enumerate(configs)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.client_app(message, context)
            except Exception as exc:  # what the SuperNode does with a ClientApp exception
                reason = f"{type(exc)}:<'{exc}'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            try:
                if self.client_app is qd_app_client:  # the app's clients (a test's own ClientApp may send anything)
                    audit_reply(reply, context.run_config, context.node_config)
            except AssertionError as leak:  # recorded, not raised: the server must not swallow it
                LEAKS.append(str(leak))
            replies.append(reply)
        self.replies.extend(replies)
        return replies
