"""qd_app ClientApp: one handler per message type of :mod:`qd_app.protocol`, each calling a task
of :mod:`qd_app.client.tasks` and replying with its records.

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

from . import protocol
from .client import tasks
from .client.tasks import ClientRun
from .errors import UserFacingError

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


def _train_reply(task: tasks.TrainTask, msg: Message, context: Context) -> Message:
    """Run a training task on the received model and settings; reply with the model and metrics."""
    client = ClientRun.from_context(context)
    started = time.perf_counter()
    arrays, metrics = task(client, msg.content[protocol.ARRAYS], msg.content[protocol.CONFIG])
    metrics[protocol.COMPUTE_SECONDS] = time.perf_counter() - started
    return Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=msg)


@app.query()
@replies_errors
def query(msg: Message, context: Context) -> Message:
    """Report this client's partition, class counts and store (the server's inventory)."""
    inventory = tasks.inventory(ClientRun.from_context(context))
    return Message(RecordDict({protocol.INVENTORY: inventory}), reply_to=msg)


@app.query(protocol.ACTIVATION_STATS)
@replies_errors
def query_activation_stats(msg: Message, context: Context) -> Message:
    """FU-MP: report per-class activation statistics of the received model's prunable units."""
    client = ClientRun.from_context(context)
    statistics = tasks.activation_stats(client, msg.content[protocol.ARRAYS], msg.content[protocol.CONFIG])
    return Message(RecordDict({protocol.STATISTICS: statistics}), reply_to=msg)


@app.train()
@replies_errors
def train(msg: Message, context: Context) -> Message:
    """Local SGD on the client's data from the received model (FedAvg)."""
    return _train_reply(tasks.local_train, msg, context)


@app.train(protocol.DISTILL)
@replies_errors
def train_distill(msg: Message, context: Context) -> Message:
    """Local SGD that also distils the client's data into its synthetic store (QuickDrop)."""
    return _train_reply(tasks.distill_train, msg, context)


@app.train(protocol.UNLEARN)
@replies_errors
def train_unlearn(msg: Message, context: Context) -> Message:
    """Gradient ascent on the forget data."""
    return _train_reply(tasks.unlearn, msg, context)


@app.train(protocol.RECOVER)
@replies_errors
def train_recover(msg: Message, context: Context) -> Message:
    """SGD on the retain data (QuickDrop: synthetic images and augmentation samples)."""
    return _train_reply(tasks.train_on_store, msg, context)


@app.train(protocol.RELEARN)
@replies_errors
def train_relearn(msg: Message, context: Context) -> Message:
    """SGD with the relearned classes or client back in."""
    return _train_reply(tasks.train_on_store, msg, context)


@app.evaluate()
@replies_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the client's own training data."""
    client = ClientRun.from_context(context)
    metrics = tasks.local_evaluate(client, msg.content[protocol.ARRAYS])
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)
