"""qd-app: a federation on this machine, and the requests of an experiment.

    qd-app federation up|down|status ...
    qd-app requests submit|list|show|cancel|verify ...

Every bad argument stops with one message naming it and what is allowed; nothing is changed.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserFacingError
from . import federation, requests


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; returns the exit status (2: bad input, nothing changed)."""
    parser = argparse.ArgumentParser(prog="qd-app", description=__doc__.split("\n\n")[0])
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    federation.add_parser(subcommands)
    requests.add_parser(subcommands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserFacingError as exc:
        message = str(exc).replace("invalid setting --", "invalid option --", 1)  # the request grammar's words
        print(f"qd-app: error: {message}", file=sys.stderr)
        return 2
