"""qd_app ClientApp: receives messages, calls :mod:`qd_app.client_tasks`, replies.

A handler that fails on bad input (a :class:`~qd_app.errors.UserFacingError`)
replies with an error whose reason is that one message, so the server can stop the
run with it; other exceptions are left to Flower.
"""

import functools
import time
from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from . import client_tasks
from .client_tasks import ClientRun
from .errors import UserFacingError
from .strategies import COMPUTE_SECONDS

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def replies_errors(handler: Handler) -> Handler:
    """Turn a user-facing error into an error reply carrying its message."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except UserFacingError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return wrapped


@app.query()
@replies_errors
def query(msg: Message, context: Context) -> Message:
    """Report this client's partition and class counts (the server's inventory)."""
    client = ClientRun.from_context(context)
    return Message(RecordDict({"inventory": client_tasks.inventory(client)}), reply_to=msg)


@app.query("activation_stats")
@replies_errors
def query_activation_stats(msg: Message, context: Context) -> Message:
    """FU-MP: report per-class activation statistics of the received model's prunable units."""
    client = ClientRun.from_context(context)
    statistics = client_tasks.activation_stats(client, msg.content["arrays"])
    return Message(RecordDict({"statistics": statistics}), reply_to=msg)


def _train_reply(task: client_tasks.TrainTask, msg: Message, context: Context) -> Message:
    client = ClientRun.from_context(context)
    started = time.perf_counter()
    arrays, metrics = task(client, msg.content["arrays"], msg.content["config"])
    metrics[COMPUTE_SECONDS] = time.perf_counter() - started
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.train()
@replies_errors
def train(msg: Message, context: Context) -> Message:
    """Local SGD on the client's data from the received model (FedAvg)."""
    return _train_reply(client_tasks.local_train, msg, context)


@app.train("distill")
@replies_errors
def train_distill(msg: Message, context: Context) -> Message:
    """Local SGD that also distils the client's data into its synthetic store (QuickDrop)."""
    return _train_reply(client_tasks.distill_train, msg, context)


@app.train("unlearn")
@replies_errors
def train_unlearn(msg: Message, context: Context) -> Message:
    """Gradient ascent on the synthetic forget data."""
    return _train_reply(client_tasks.unlearn, msg, context)


@app.train("recover")
@replies_errors
def train_recover(msg: Message, context: Context) -> Message:
    """SGD on the synthetic retain data and augmentation samples."""
    return _train_reply(client_tasks.train_on_store, msg, context)


@app.train("relearn")
@replies_errors
def train_relearn(msg: Message, context: Context) -> Message:
    """SGD on the synthetic data with the relearned classes or client back in."""
    return _train_reply(client_tasks.train_on_store, msg, context)


@app.evaluate()
@replies_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the client's own training data."""
    client = ClientRun.from_context(context)
    metrics = client_tasks.local_evaluate(client, msg.content["arrays"])
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
