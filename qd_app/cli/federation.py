"""``qd-app federation``: a SuperLink and SuperNodes on this machine (loopback), started, stopped, listed."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..deploy.federation import LocalFederation


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    """The ``federation`` subcommand and its actions."""
    parser = subcommands.add_parser("federation", help="a SuperLink and SuperNodes on this machine")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument("--dir", required=True, type=Path, help="the folder that holds the federation")
    up = actions.add_parser("up", parents=[folder], help="start the SuperLink and SuperNodes (those not running)")
    up.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (one partition each)")
    up.add_argument("--name", default="qd-local", help="the connection name for flwr run (default: qd-local)")
    up.add_argument("--secure", action="store_true", help="TLS and SuperNode authentication")
    up.add_argument("--plain", action="store_true",
                    help="Flower's own SuperNode and Grid, without the app's shorter rounds (a baseline)")
    up.add_argument("--client-models", default="", metavar="A,B,...",
                    help="HDUS: the SuperNodes' main-model architectures, cycled over them (node config "
                         "client-model), e.g. convnet-s,mlp,convnet-l")
    up.add_argument("--port", type=int, default=0,
                    help="first of N+1 consecutive ports (SuperLink, then each SuperNode); default: free ones")
    down = actions.add_parser("down", parents=[folder], help="stop the federation's processes and their children")
    down.add_argument("--node", type=int, action="append", metavar="PARTITION",
                      help="stop only this SuperNode (repeatable); default: everything")
    actions.add_parser("status", parents=[folder], help="what runs")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Carry out one ``federation`` action; returns the exit status."""
    federation = LocalFederation(args.dir)
    if args.action == "up":
        if not args.secure:
            print("qd-app: insecure mode (plain HTTP, any SuperNode may join): for loopback only; use --secure "
                  "on a network")
        state = federation.up(args.nodes, args.name, args.secure, args.port, args.plain, args.client_models)
        print(f"federation {state.name!r} up: SuperLink {state.address}, {len(state.nodes)} SuperNodes "
              f"({'TLS, authenticated nodes' if state.secure else 'insecure'}); run the app with: "
              f"flwr run . {state.name} --stream")
        return 0
    if args.action == "down":
        stopped = federation.down(args.node)
        print(f"stopped {len(stopped)} process(es)")
        return 0
    for what, where, pid, running in federation.status():
        print(f"{what:<10} {where:<28} pid {pid if pid else '-':<8} {'running' if running else 'stopped'}")
    return 0
