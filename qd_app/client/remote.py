"""Hand a ClientApp's task to the node's worker process, and bring its reply back.

On a real federation every message starts a new ClientApp process; importing torch and
loading the client's data in each would cost seconds per message. With ``worker=true``
in its node config, a node keeps one worker process (:mod:`qd_app.client.worker`) that
holds them between messages; the ClientApp process only forwards the message's records
over a local socket and imports neither torch nor the data. The worker is started by
the first ClientApp that finds none; it stops when the node's SuperExec does, or after
``IDLE_SECONDS`` without a message.

The worker runs the code of the app that started it (Flower installs each app version
in a folder of its own): the socket lives in Linux's abstract namespace, named after the
node's partition, its store folder and that code, and a worker started for a new version
of the app stops the one before it. A key of 32 random bytes in the node's store folder
(readable by its owner only) authenticates both ends.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .. import errors
from ..config import RunConfig
from ..errors import UserFacingError
from ..node_config import NodeSettings

START_TIMEOUT_S = 180.0  # a worker starting beside others on a small machine
IDLE_SECONDS = 1800.0
CODE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the qd_app this ClientApp runs
STOP = "stop"
RECORD_TYPES = {"arrays": ArrayRecord, "config": ConfigRecord, "metrics": MetricRecord}


def worker_place(run_config: Mapping[str, Any], node: NodeSettings) -> tuple[str, Path]:
    """The worker's socket address and key file for this node."""
    folder = node.apply(RunConfig.from_run_config(run_config)).store_path
    name = hashlib.sha256(f"{node.partition_id}|{folder.resolve()}|{CODE_ROOT}".encode()).hexdigest()[:24]
    return f"\0qd-app-worker-{name}", folder / f".worker-{node.partition_id}.key"


def run_remote(message_type: str, content: RecordDict, run_config: Mapping[str, Any],
               node_config: Mapping[str, Any], node: NodeSettings) -> RecordDict:
    """The reply content of a task, computed by the node's worker (started if there is none)."""
    address, key_file = worker_place(run_config, node)
    with _connect(address, key_file) as connection:
        connection.send({"type": message_type, "content": to_plain(content), "run-config": dict(run_config),
                         "node-config": dict(node_config)})
        reply = connection.recv()
    if reply["ok"]:
        return from_plain(reply["content"])
    if reply["user-facing"]:  # a bad setting or store: the same error the task raises in process
        raise getattr(errors, reply["error"], UserFacingError)(reply["message"])
    raise RuntimeError(f"the node's worker failed: {reply['message']}")


def _connect(address: str, key_file: Path) -> Connection:
    key = _key(key_file)
    try:
        return Client(address, family="AF_UNIX", authkey=key)
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    _stop_predecessor(address, key_file, key)
    log = key_file.with_suffix(".log")
    path = os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))
    with open(log, "ab") as output:
        subprocess.Popen(  # pylint: disable=consider-using-with  (it outlives this process)
            [sys.executable, "-m", "qd_app.client.worker", "--address", address[1:], "--key-file", str(key_file),
             "--watch", str(os.getppid()), "--idle-seconds", str(IDLE_SECONDS)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path},
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            return Client(address, family="AF_UNIX", authkey=key)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node's worker did not start within {START_TIMEOUT_S:.0f} s "
                                   f"(its log: {log})") from None
            time.sleep(0.1)


def _stop_predecessor(address: str, key_file: Path, key: bytes) -> None:
    """Stop the node's worker of an earlier version of the app, if one runs; remember this one."""
    record = key_file.with_suffix(".address")
    previous = record.read_text() if record.exists() else ""
    if previous and previous != address[1:]:
        try:
            with Client("\0" + previous, family="AF_UNIX", authkey=key) as connection:
                connection.send(STOP)
        except (ConnectionRefusedError, FileNotFoundError, EOFError):
            pass  # it is gone already
    record.write_text(address[1:])


def _key(key_file: Path) -> bytes:
    """The node's worker key, created on first use (owner-only, written atomically)."""
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = key_file.with_name(f"{key_file.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(32))
        os.replace(temporary, key_file)
    return key_file.read_bytes()


def to_plain(content: RecordDict) -> dict[str, tuple[str, dict[str, Any]]]:
    """Records as plain Python and numpy values, to send to the worker."""
    plain: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            plain[name] = ("arrays", {key: array.numpy() for key, array in record.items()})
        else:
            plain[name] = ("metrics" if isinstance(record, MetricRecord) else "config", dict(record))
    return plain


def from_plain(plain: dict[str, tuple[str, dict[str, Any]]]) -> RecordDict:
    """Inverse of :func:`to_plain`."""
    records = {}
    for name, (kind, values) in plain.items():
        if kind == "arrays":
            records[name] = ArrayRecord({key: Array(value) for key, value in values.items()})
        else:
            records[name] = RECORD_TYPES[kind](values)
    return RecordDict(records)
