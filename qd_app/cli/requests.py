"""``qd-app requests``: queue requests to forget, and read or check an experiment's ledger.

Requests are written to the experiment's ledger on the server's disk; a later
``flwr run`` with ``phase='serve'`` serves the pending ones in order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import DATASET_CLASSES, RunConfig
from ..errors import ConfigError, LedgerError
from ..request import UNLEARN, parse_requests
from ..server.ledger import Ledger
from ..server.results import CHECKPOINT_FILE, ExperimentRecord, load_checkpoint


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    """The ``requests`` subcommand and its actions."""
    parser = subcommands.add_parser("requests", help="queue requests to forget; list, show, cancel, verify them")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    experiment = argparse.ArgumentParser(add_help=False)
    experiment.add_argument("--output-dir", default="", help="the run config's output-dir (default: the app's)")
    experiment.add_argument("--experiment", default="default", help="the run config's experiment (default: default)")
    submit = actions.add_parser("submit", parents=[experiment], help="queue a request to forget classes or clients")
    target = submit.add_mutually_exclusive_group(required=True)
    target.add_argument("--forget-class", metavar="SPEC", help="classes, as the setting: 9, 3+5, 5,8,0 or all")
    target.add_argument("--forget-client", metavar="SPEC", help="clients (partition ids), as the setting")
    submit.add_argument("--requester", default="", help="who asks (recorded with the request)")
    actions.add_parser("list", parents=[experiment], help="every request and its state")
    show = actions.add_parser("show", parents=[experiment], help="one request, its attempts and its outcome")
    show.add_argument("id", type=int)
    cancel = actions.add_parser("cancel", parents=[experiment], help="withdraw a pending request")
    cancel.add_argument("id", type=int)
    cancel.add_argument("--reason", default="cancelled by its requester")
    actions.add_parser("verify", parents=[experiment], help="check the ledger's hash chain")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Carry out one ``requests`` action; returns the exit status."""
    output_path = experiment_path(args.output_dir, args.experiment)
    ledger = Ledger(output_path)
    if args.action == "submit":
        return submit(ledger, args)
    if not (output_path / CHECKPOINT_FILE).exists() and not ledger.path.exists():
        raise LedgerError(unknown_experiment(output_path))
    if args.action == "list":
        for request in ledger.requests():
            print(f"{request.id:>4}  {request.state:<9}  {request.action} {request.request.label:<14}  "
                  f"received {request.received_at[:19]}  by {request.requester}"
                  + (f"  ({request.reason})" if request.reason else ""))
        return 0
    if args.action == "show":
        print(json.dumps(ledger.get(args.id).as_dict(), indent=2))
        return 0
    if args.action == "cancel":
        ledger.cancel(args.id, args.reason)
        print(f"request {args.id}: cancelled")
        return 0
    problems = ledger.verify()
    for problem in problems:
        print(problem)
    print(f"{ledger.path}: " + (f"{len(problems)} problem(s)" if problems else
                                f"intact ({len(ledger.requests())} requests, every event as recorded)"))
    return 1 if problems else 0


def submit(ledger: Ledger, args: argparse.Namespace) -> int:
    """Queue the requests a ``--forget-class`` / ``--forget-client`` SPEC names, checked against the
    trained model (its dataset's classes, its federation's clients)."""
    output_path = ledger.output_path
    if not (output_path / CHECKPOINT_FILE).exists():
        raise LedgerError(unknown_experiment(output_path))
    record = ExperimentRecord.load(output_path)
    trained = (record.config if record else {})
    if args.forget_class is not None:
        dataset = load_checkpoint(output_path)["dataset"]
        requests = parse_requests("--forget-class", args.forget_class, "class", limit=DATASET_CLASSES[dataset],
                                  seed=int(trained.get("seed", 0)))
    else:
        clients = (record.federation.get("num-partitions") if record else None) or None
        requests = parse_requests("--forget-client", args.forget_client, "client", limit=clients)
    if not requests:
        raise ConfigError("nothing to submit: the SPEC names no class or client")
    requester = args.requester.strip() or "qd-app requests submit"
    for request in requests:
        request_id = ledger.receive(UNLEARN, request, requester, "submit")
        print(f"request {request_id}: forget {request.label} (pending; served by a run with phase='serve')")
    return 0


def experiment_path(output_dir: str, experiment: str) -> Path:
    """The experiment's folder, named and checked as the run config does (a relative
    ``--output-dir`` is taken from the current folder)."""
    absolute = str(Path(output_dir).expanduser().resolve()) if output_dir else ""
    try:
        return RunConfig(output_dir=absolute, experiment=experiment).output_path
    except ConfigError as exc:  # the setting's message, in the words of the command line
        raise ConfigError(str(exc).replace("invalid setting ", "invalid option --", 1)) from None


def unknown_experiment(output_path: Path) -> str:
    """Why an experiment folder does not do, and which ones there are."""
    known = sorted(p.name for p in output_path.parent.glob("*") if (p / CHECKPOINT_FILE).exists())
    return (f"unknown experiment {output_path.name!r}: no trained model in {output_path} (train it with "
            f"phase='train' first); experiments there: {', '.join(known) if known else 'none'}")
