"""Where a ClientApp's task runs: in this process, or in the node's worker process.

With ``worker=true`` in the node config the task goes to the worker
(:mod:`qd_app.client.remote`), and this process never imports torch or the task code:
that is the point, since each message of a real federation starts a new ClientApp
process. Otherwise (simulation, tests) the task runs here.
"""

from __future__ import annotations

from flwr.app import Context, RecordDict

from ..node_config import NodeSettings
from .remote import run_remote


def answer(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content of the task ``message_type`` names."""
    node = NodeSettings.from_node_config(context.node_config)
    if node.worker:
        return run_remote(message_type, content, context.run_config, context.node_config, node)
    from .run import kept_client  # pylint: disable=import-outside-toplevel  (torch: only where the task runs)
    from .tasks import run_task  # pylint: disable=import-outside-toplevel

    return run_task(message_type, kept_client(context.run_config, context.node_config), content)
