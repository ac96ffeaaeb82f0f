"""qd_app ClientApp: one handler per message type of :mod:`qd_app.protocol`, each answering with
the task of :mod:`qd_app.client.tasks` that the type names (run here, or in the node's worker).

A handler that fails on bad input (a :class:`~qd_app.errors.UserFacingError`)
replies with an error whose reason is that one message, so the server can stop the
run with it; other exceptions are left to Flower.
"""

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from . import protocol
from .client.dispatch import answer
from .errors import UserFacingError

app = ClientApp()


def reply(msg: Message, context: Context) -> Message:
    """The task's reply (arrays packed when the message's were); a user-facing error becomes an
    error reply carrying its message."""
    try:
        content = answer(msg.metadata.message_type, protocol.unpack_arrays(msg.content), context)
        return Message(protocol.pack_arrays(content) if protocol.is_packed(msg.content) else content, reply_to=msg)
    except UserFacingError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this client's partition, class counts and store (the server's inventory)."""
    return reply(msg, context)


@app.query(protocol.ACTIVATION_STATS)
def query_activation_stats(msg: Message, context: Context) -> Message:
    """FU-MP: report per-class activation statistics of the received model's prunable units."""
    return reply(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD on the client's data from the received model (FedAvg)."""
    return reply(msg, context)


@app.train(protocol.DISTILL)
def train_distill(msg: Message, context: Context) -> Message:
    """Local SGD that also distils the client's data into its synthetic store (QuickDrop)."""
    return reply(msg, context)


@app.train(protocol.UNLEARN)
def train_unlearn(msg: Message, context: Context) -> Message:
    """Gradient ascent on the forget data."""
    return reply(msg, context)


@app.train(protocol.RECOVER)
def train_recover(msg: Message, context: Context) -> Message:
    """SGD on the retain data (QuickDrop: synthetic images and augmentation samples)."""
    return reply(msg, context)


@app.train(protocol.RELEARN)
def train_relearn(msg: Message, context: Context) -> Message:
    """SGD with the relearned classes or client back in."""
    return reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the client's own training data."""
    return reply(msg, context)


@app.train(protocol.SEED)
def train_seed(msg: Message, context: Context) -> Message:
    """HDUS: train the client's main model, distil its seed model, reply with the seed model."""
    return reply(msg, context)


@app.evaluate(protocol.KEEP_SEEDS)
def evaluate_keep_seeds(msg: Message, context: Context) -> Message:
    """HDUS: keep the neighbours' seed models the message carries."""
    return reply(msg, context)


@app.evaluate(protocol.DROP_SEEDS)
def evaluate_drop_seeds(msg: Message, context: Context) -> Message:
    """HDUS: delete forgotten clients' seed models (a forgotten client deletes its own state)."""
    return reply(msg, context)


@app.evaluate(protocol.ENSEMBLE)
def evaluate_ensemble(msg: Message, context: Context) -> Message:
    """HDUS: test accuracy of the client's main model alone and of its ensemble."""
    return reply(msg, context)
