"""A Flower deployment on this machine: one SuperLink and N SuperNodes on loopback, under one folder.

``DIR`` holds everything: ``federation.json`` (ports, PIDs and settings, rewritten
atomically after every change), ``superlink/`` (its database and Flower home),
``node-<i>/`` (each SuperNode's Flower home and its store folder, as on a disk of its
own), ``data/`` (the datasets, fetched once for all nodes), ``logs/``, and in secure
mode ``certs/`` and ``keys/``. Each SuperNode gets ``partition-id``, ``num-partitions``,
``data-dir`` and ``store-dir`` in its node config (and ``client-model`` with
``--client-models``): the same settings a SuperNode on another machine is started with.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..config import ARCHITECTURES
from ..errors import ConfigError, FederationError
from ..server.grid import PLAIN_GRID
from . import connection, security
from .processes import BIN, OFFLINE_ENVIRONMENT, Process, free_ports, port_free, start, stop, tail, wait_for_port

STATE_FILE = "federation.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
NODE_READY_TIMEOUT_S = 90.0
# a SuperNode's SuperExec looks for a ClientApp task every second by default: a fifth of that
NODE_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


@dataclass
class Node:
    """One SuperNode: its partition, the port of its ClientApp runtime, and its process."""

    partition: int
    port: int
    process: dict[str, int] | None = None
    registered: bool = False  # secure mode: its public key is known to the SuperLink
    client_model: str | None = None  # HDUS: its main model's architecture (node config client-model)


@dataclass
class FederationState:  # pylint: disable=too-many-instance-attributes
    """What ``federation.json`` records."""

    name: str
    secure: bool
    port: int
    nodes: list[Node]
    superlink: dict[str, int] | None = None
    plain: bool = False  # Flower's own SuperNode and Grid (no node worker, no shorter waits): a baseline
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share one port)."""
        return f"127.0.0.1:{self.port}"


class LocalFederation:
    """The federation recorded in one folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"invalid option --dir={str(folder)!r}: it is a file, not a folder")
        self.folder = folder.resolve()
        self.state_path = self.folder / STATE_FILE

    # ------------------------------------------------------------------ state
    def load(self) -> FederationState | None:
        """The recorded federation, or None when the folder holds none."""
        if not self.state_path.exists():
            return None
        content = json.loads(self.state_path.read_text())
        content["nodes"] = [Node(**node) for node in content["nodes"]]
        return FederationState(**content)

    def save(self, state: FederationState) -> None:
        """Record the federation atomically."""
        atomic_write_text(self.state_path, json.dumps(asdict(state), indent=2) + "\n")

    def node_config(self, state: FederationState, node: Node) -> str:
        """The ``--node-config`` of one SuperNode."""
        return (f"partition-id={node.partition} num-partitions={len(state.nodes)} "
                f"data-dir='{self.folder / 'data'}' store-dir='{self.folder / f'node-{node.partition}' / 'store'}' "
                f"worker={'false' if state.plain else 'true'}"
                + (f" client-model='{node.client_model}'" if node.client_model else ""))

    # ------------------------------------------------------------------ up
    def plan(self, nodes: int, name: str, secure: bool, port: int, plain: bool = False,
             client_models: str = "") -> FederationState:
        """The federation to bring up: the recorded one (its settings must match), or a new one."""
        if nodes < 1:
            raise ConfigError(f"invalid option --nodes={nodes}: must be >= 1")
        models = [m.strip() for m in client_models.split(",")] if client_models.strip() else []
        if any(m not in ARCHITECTURES for m in models):
            raise ConfigError(f"invalid option --client-models={client_models!r}: architecture names separated by "
                              f"',' (cycled over the nodes), each one of {', '.join(ARCHITECTURES)}")
        architectures = [models[i % len(models)] if models else None for i in range(nodes)]
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"invalid option --name={name!r}: letters, digits, '_' and '-' only")
        recorded = self.load()
        if recorded is not None:
            recorded_models = [node.client_model for node in recorded.nodes]
            if ((len(recorded.nodes), recorded.secure, recorded.name, recorded.plain) != (nodes, secure, name, plain)
                    or (models and recorded_models != architectures)):
                raise ConfigError(
                    f"{self.folder} holds a federation of {len(recorded.nodes)} nodes, "
                    f"{'secure' if recorded.secure else 'insecure'}{', plain' if recorded.plain else ''}, named "
                    f"{recorded.name!r}, client models {recorded_models}: bring it up with those options, "
                    "or use another --dir")
            return recorded
        if port:
            if not 1024 <= port <= 65535 - nodes:
                raise ConfigError(f"invalid option --port={port}: must leave room for {nodes + 1} ports in 1024-65535")
            ports = list(range(port, port + nodes + 1))
        else:
            ports = free_ports(nodes + 1)
        return FederationState(name, secure, ports[0], [Node(i, p, client_model=architectures[i])
                                                        for i, p in enumerate(ports[1:])], plain=plain)

    def up(self, nodes: int, name: str = "qd-local", secure: bool = False, port: int = 0,
           plain: bool = False, client_models: str = "") -> FederationState:
        """Start what is not running of the federation (see :meth:`plan`), register its connection,
        and wait until every SuperNode has joined. On failure, stop what this call started."""
        state = self.plan(nodes, name, secure, port, plain, client_models)
        wanted = [("superlink", state.port, state.superlink)] + [
            (f"node {n.partition}", n.port, n.process) for n in state.nodes]
        for what, wanted_port, process in wanted:
            if not (process and Process(**process).alive()) and not port_free(wanted_port):
                raise FederationError(f"port {wanted_port} ({what}) is in use: choose another --port, or stop what "
                                      "uses it")
        self.folder.mkdir(parents=True, exist_ok=True)
        started: list[Process] = []
        try:
            self._start_superlink(state, started)
            for node in state.nodes:
                self._start_node(state, node, started)
        except BaseException:
            stop(started)
            if state.superlink and not Process(**state.superlink).alive():
                state.superlink = None
            for node in state.nodes:
                if node.process and not Process(**node.process).alive():
                    node.process = None
            self.save(state)
            raise
        return state

    def _start_superlink(self, state: FederationState, started: list[Process]) -> None:
        if state.superlink and Process(**state.superlink).alive():
            return
        home = self.folder / "superlink"
        command = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(state.port),
                   "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"]
        if state.secure:
            certs = security.write_certificates(self.folder / "certs") if not (self.folder / "certs").exists() \
                else {"ca": self.folder / "certs" / "ca.crt", "certificate": self.folder / "certs" / "superlink.crt",
                      "key": self.folder / "certs" / "superlink.key"}
            command += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["certificate"]),
                        "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth"]
        else:
            command.append("--insecure")
        log = self.folder / "logs" / "superlink.log"
        popen, process = start(command, {"FLWR_HOME": str(home), **({PLAIN_GRID: "1"} if state.plain else {})}, log)
        started.append(process)
        state.superlink = process.as_dict()
        self.save(state)
        wait_for_port(state.port, popen, log)
        connection.register(state.name, state.address, self.ca if state.secure else None)

    @property
    def ca(self) -> Path:
        """The certificate authority of a secure federation."""
        return self.folder / "certs" / "ca.crt"

    def _start_node(self, state: FederationState, node: Node, started: list[Process]) -> None:
        if node.process and Process(**node.process).alive():
            return
        home = self.folder / f"node-{node.partition}"
        launcher = [str(BIN / "flower-supernode")] if state.plain else [str(BIN / "python"), "-m",
                                                                         "qd_app.deploy.supernode"]
        command = [*launcher, "--superlink", state.address, "--port", str(node.port),
                   "--node-config", self.node_config(state, node)]
        if state.secure:
            key = self.folder / "keys" / f"node-{node.partition}"
            if not node.registered:
                self._register(state, security.write_node_key(key))
                node.registered = True
            command += ["--root-certificates", str(self.ca), "--auth-supernode-private-key", str(key)]
        else:
            command.append("--insecure")
        log = self.folder / "logs" / f"node-{node.partition}.log"
        offset = log.stat().st_size if log.exists() else 0
        threads = str(max(1, (os.cpu_count() or 1) // len(state.nodes)))  # the nodes share this machine's cores
        environment = {"FLWR_HOME": str(home / "flwr"), "OMP_NUM_THREADS": threads, **({} if state.plain else NODE_POLL)}
        popen, process = start(command, environment, log)
        started.append(process)
        node.process = process.as_dict()
        self.save(state)
        self._wait_until_joined(popen, log, offset)

    def _register(self, state: FederationState, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        home = self.folder / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink.{state.name}]\naddress = "{state.address}"\nroot-certificates = "{self.ca}"\n')
        result = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(public_key), state.name],
            env={**os.environ, **OFFLINE_ENVIRONMENT, "FLWR_HOME": str(home)}, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise FederationError(f"registering {public_key.name} with the SuperLink failed:\n"
                                  f"{(result.stdout + result.stderr)[-1500:]}")

    @staticmethod
    def _wait_until_joined(popen: subprocess.Popen, log: Path, offset: int) -> None:
        """Wait until the SuperNode's log says it has its node ID (it joined the SuperLink)."""
        deadline = time.monotonic() + NODE_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if "SuperNode ID" in log.read_text(errors="replace")[offset:]:
                return
            if popen.poll() is not None:
                raise FederationError(f"the SuperNode exited with {popen.returncode}:\n{tail(log)}")
            time.sleep(0.2)
        raise FederationError(f"the SuperNode did not join within {NODE_READY_TIMEOUT_S:.0f} s:\n{tail(log)}")

    # ------------------------------------------------------------------ down, status
    def down(self, partitions: list[int] | None = None) -> list[int]:
        """Stop the SuperNodes of ``partitions`` (all: also the SuperLink, and its connection is
        removed from the Flower config); returns the PIDs signalled."""
        state = self.require()
        chosen = state.nodes if partitions is None else [self._node(state, p) for p in partitions]
        signalled = stop([Process(**n.process) for n in chosen if n.process])
        for node in chosen:
            node.process = None
        if partitions is None:
            signalled += stop([Process(**state.superlink)] if state.superlink else [])
            state.superlink = None
            connection.unregister(state.name, state.address)
        self.save(state)
        return signalled

    def status(self) -> list[tuple[str, str, int | None, bool]]:
        """(what, address or port, PID, running) of every recorded process."""
        state = self.require()
        rows = [("superlink", state.address, (state.superlink or {}).get("pid"),
                 bool(state.superlink and Process(**state.superlink).alive()))]
        for node in state.nodes:
            rows.append((f"node {node.partition}", f"partition {node.partition}, port {node.port}",
                         (node.process or {}).get("pid"), bool(node.process and Process(**node.process).alive())))
        return rows

    def require(self) -> FederationState:
        """The recorded federation; an error says how to make one when there is none."""
        state = self.load()
        if state is None:
            raise ConfigError(f"no federation in {self.folder}: start one with qd-app federation up --dir {self.folder}")
        return state

    @staticmethod
    def _node(state: FederationState, partition: int) -> Node:
        if not 0 <= partition < len(state.nodes):
            raise ConfigError(f"invalid option --node={partition}: the federation has nodes 0-{len(state.nodes) - 1}")
        return state.nodes[partition]
