"""The server side of a run: train or load a model, serve the planned requests, record everything.

``phase`` picks the work:

- ``all``: train, serve every request (unlearn + recover), then relearn the last
  request (when ``relearn-rounds`` > 0);
- ``train``: train only (QuickDrop's clients keep their stores);
- ``unlearn``: load the current model (and, for QuickDrop, the clients' stores) and
  serve the requests;
- ``relearn``: load them and relearn forgotten classes or clients (those named by
  ``forget-class`` / ``forget-client``, else the latest request still in force);
- ``serve``: load them and serve the requests waiting in the ledger (``qd-app requests
  submit``), in order, or those ``request-ids`` names.

The run's method (an :class:`~qd_app.server.method.UnlearningMethod`, e.g. one of
:mod:`qd_app.methods`) supplies the stages. Requests of the run config are checked
against the federation, the stores and the ledger before any stage runs, so a bad one
changes nothing; then they enter the ledger like submitted ones. A request that cannot
be served now (a stage failed) records the failed attempt and stays pending; in
``phase=serve`` one that can never be served is refused with the reason.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.common import log
from flwr.serverapp import Grid

from .. import protocol
from ..config import RunConfig
from ..core.data import dataset_spec
from ..core.models import ModelSpec
from ..core.training import resolve_device
from ..errors import ConfigError, FederationError, RequestError, StageFailedError
from ..request import NOTHING_FORGOTTEN, UNLEARN, UnlearningRequest
from . import planner
from .evaluation import ServerEvaluator, SplitAccuracy, request_split
from .federation import Federation, discover_federation, recorded_federation
from .grid import for_short_rounds
from .ledger import RUNNING, Ledger
from .method import MethodContext, UnlearningMethod
from .results import (CHECKPOINT_FILE, TRAINED_CHECKPOINT_FILE, ExperimentRecord, StageRecord, check_checkpoint,
                      entry_summary, load_checkpoint, model_digest, plot_class_accuracy, save_checkpoint,
                      stores_summary, write_results)
from .stages import ResetStage, Stage, StagePlan


NOTHING_LEFT = "no data left to keep: the initial model, as Retrain-Or would return"
Step = tuple[str, UnlearningRequest, int | None]  # action, request, ledger id (None: not recorded yet)


class Experiment:  # pylint: disable=too-many-instance-attributes
    """One run of one method over one federation, and the records it leaves."""

    def __init__(self, grid: Grid, config: RunConfig, method: UnlearningMethod) -> None:
        self.grid = grid
        self.config = config
        self.method = method
        self.output_path: Path = config.output_path
        self.spec = dataset_spec(config.dataset)
        self.model_spec = ModelSpec.from_config(config)
        random.seed(config.seed)
        self.federation = self._federation()  # first: a client that cannot start says why
        self.evaluator = ServerEvaluator(config, resolve_device(config.device))
        self.context = MethodContext(config, self.federation, self.model_spec, self.evaluator, self.output_path,
                                     random.Random(config.seed))
        self.ledger = Ledger(self.output_path)
        self.lineage = ""
        self.checkpoint: dict[str, Any] = {}
        self.forgotten = NOTHING_FORGOTTEN
        self.record = ExperimentRecord(config=config.resolved_run_config())
        self.run_index = 0
        self.trained_partitions: list[int] | None = None

    def _federation(self) -> Federation:
        """Every node is asked who it is, except in a run that only unlearns with a method that
        contacts no client (ISPF): the training record says, and nobody need be connected."""
        if self.config.phase == "unlearn" and not self.method.needs_clients(self.config, UNLEARN):
            recorded = recorded_federation(getattr(ExperimentRecord.load(self.output_path), "federation", {}))
            if recorded is not None:  # without a training record the nodes are asked
                log(INFO, "Method %s works on the server alone: no client is contacted", self.method.name)
                return recorded
        return discover_federation(self.grid, self.config.node_wait_seconds)

    # ----------------------------------------------------------------- planning
    def plan(self) -> list[Step]:
        """The steps this run serves. The run config's requests are checked against the federation,
        the method, the stored state and the stores (:class:`RequestError` before any work);
        ``phase=serve`` takes the ledger's pending requests, checked one by one when served."""
        config = self.config
        requests = config.requests() if config.phase != "serve" else []
        planner.check_client_ids(requests, self.federation, config.forget_client)
        if config.phase not in ("all", "train"):
            self._load_state()
        if config.phase == "serve":
            return [(r.action, r.request, r.id) for r in self.ledger.pending(config.serve_ids())]
        plan = planner.plan_requests(config.phase, requests, config.relearn_rounds,
                                     lambda: self.ledger.latest_in_force(self.lineage))
        participants: set[int] = set()
        for action, request, state in planner.walk(plan, self.forgotten):
            self._check(action, request, state)
            if not self.federation.missing:  # else serving it records a failed attempt
                participants |= set(self.method.participants(self.context, action, request, state))
        if config.phase != "all" and self.method.data == protocol.SYNTHETIC:
            planner.check_stores(self.federation, participants)
        return [(action, request, None) for action, request in plan]

    def _check(self, action: str, request: UnlearningRequest, state) -> None:
        """Refuse what can never be served from ``state`` (a :class:`RequestError` with the reason)."""
        planner.check_client_ids([request], self.federation, ",".join(map(str, request.targets)))
        self.method.check(self.context, action, request)
        planner.check_request(action, request, state, self.federation)

    def record_requests(self, steps: list[Step]) -> list[Step]:
        """Enter the run config's requests in the ledger (a pending one asking the same is reused)."""
        recorded = []
        for action, request, request_id in steps:
            if request_id is None:
                request_id = self.ledger.receive_once(action, request, requester="run config", source="run-config")
            recorded.append((action, request, request_id))
        return recorded

    def _load_state(self) -> None:
        """Current model's lineage and forgotten state, the earlier results, a repaired ledger."""
        checkpoint = self.checkpoint = load_checkpoint(self.output_path)
        identity = {"dataset": self.config.dataset, "model": self.model_spec.as_dict(),
                    "experiment": self.config.experiment}
        check_checkpoint(checkpoint, self.output_path, identity, self.method.name, self.method.global_model)
        self.lineage = checkpoint["lineage"]
        self.ledger.import_old_log()
        self.ledger.repair(self.lineage, checkpoint["log-entries"], checkpoint["last-log-entry"])
        for request in self.ledger.requests():
            if request.state == RUNNING:  # a run died while serving it: its model was never saved
                self.ledger.interrupt(request.id)
                log(WARNING, "Request %s (%s) was interrupted in an earlier run; it is pending again", request.id,
                    request.request.label)
        self.forgotten = self.ledger.forgotten(self.lineage)
        self._trained_by(checkpoint.get("trained-partitions"))
        previous = ExperimentRecord.load(self.output_path)
        if previous is not None and previous.runs and previous.runs[0].get("lineage") == self.lineage:
            previous.config = self.record.config
            self.record = previous
            self.evaluator.history = list(previous.rounds)

    # ------------------------------------------------------------------ stages
    def run_stage(self, stage: Stage, arrays: ArrayRecord, num_rounds: int, request: int | None = None,
                  split: Callable[[ArrayRecord], SplitAccuracy] | None = None) -> ArrayRecord:
        """Run one stage for up to ``num_rounds`` rounds, record it, and return the new global model."""
        name = stage.stage_name
        eval_seconds_before = self.evaluator.seconds
        first_round = self.evaluator.last_round + 1
        evaluate_fn = self.evaluator.for_stage(name) if self.method.global_model else lambda *_: None
        arrays, cost = stage.run(self.grid, arrays, num_rounds, evaluate_fn)
        if cost.evaluation is not None:  # the clients evaluated the stage's outcome
            self.evaluator.record(name, cost.rounds, *cost.evaluation)
        last = self.evaluator.history[-1]
        record = StageRecord.from_cost(
            name, cost, eval_seconds=self.evaluator.seconds - eval_seconds_before, accuracy=last.accuracy,
            class_accuracy=last.class_accuracy, first_round=first_round, last_round=last.round, run=self.run_index,
            request=request, split=split(arrays) if split else None,
        )
        self.record.stages.append(record)
        self.record.rounds = list(self.evaluator.history)
        if request is None:  # a request's stages are written with it, once it is served
            write_results(self.output_path, self.record)
        log(INFO, "Stage %s: %s", name, record.summary())
        return arrays

    def start_run(self) -> None:
        """Record this run (phase, time, lineage) in results.json's ``runs``."""
        self.run_index = len(self.record.runs)
        self.record.runs.append({"phase": self.config.phase, "started-at": _now(), "lineage": self.lineage,
                                 "config": self.config.resolved_run_config()})

    def train(self) -> ArrayRecord:
        """Federated training of a new lineage with the method's training stage (QuickDrop:
        with distillation into new stores); client updates recorded when configured."""
        if self.federation.missing:
            raise FederationError(f"partitions {self.federation.missing} did not connect within "
                                  f"node-wait-seconds={self.config.node_wait_seconds:g}: training needs every one")
        self.lineage = f"{_now()}-{uuid.uuid4().hex[:8]}"
        self.start_run()
        self.record.federation = self.federation.as_record()
        history = self.context.history()
        history.clear()  # updates of an earlier trained model
        stage = self.method.training(self.context)
        initial = self.context.initial_model() if self.method.global_model else ArrayRecord()
        arrays = self.run_stage(stage, initial, self.config.num_server_rounds)
        if history.interval:
            self.record.stores["federaser-bytes"] = history.size_bytes()
        answered = getattr(stage, "latest_metrics", None)  # None: the stage does not say, so every partition
        self._record_stores(answered or {})
        self._trained_by(None if answered is None else sorted(map(self.federation.partition_of, answered)))
        self.save_model(arrays, TRAINED_CHECKPOINT_FILE)
        self.save_model(arrays)
        return arrays

    def load_model(self) -> ArrayRecord:
        """The current global model of this experiment (checked in :meth:`plan`)."""
        self.start_run()
        if self.federation.connected:
            self._record_stores({node: {protocol.STORE_BYTES: info.store_bytes}
                                 for node, info in self.federation.clients.items()})
        return ArrayRecord(self.checkpoint["state-dict"])

    def serve(self, action: str, request: UnlearningRequest, request_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """Unlearn or relearn one request with the method's stages; record it and save the model.

        In ``phase=serve`` a request that can never be served is refused in the ledger (the
        run goes on); a stage that fails records a failed attempt and stops the run, the
        request pending for the next one.
        """
        log(INFO, "%s %s (request %s)", action.capitalize(), request.label, request_id)
        before = self.forgotten
        if self.config.phase == "serve":
            try:
                self._check(action, request, before)
            except RequestError as exc:
                self.ledger.refuse(request_id, str(exc))
                log(WARNING, "Request %s refused: %s", request_id, exc)
                return arrays
        self.ledger.start(request_id, {"run": self.run_index, "method": self.method.name,
                                       "model-before": model_digest(arrays.to_torch_state_dict())})
        try:
            missing = sorted(set(self.federation.missing)
                             & self.method.required_partitions(self.context, action, request, before))
            if missing:
                raise FederationError(f"partitions {missing} are not connected (the server waited "
                                      f"node-wait-seconds={self.config.node_wait_seconds:g})")
            if self.config.phase == "serve" and self.method.data == protocol.SYNTHETIC:
                planner.check_stores(self.federation,
                                     set(self.method.participants(self.context, action, request, before)))
            return self._serve(action, request, request_id, arrays)
        except (RequestError, StageFailedError, FederationError) as exc:
            self.ledger.fail(request_id, str(exc))
            log(WARNING, "Request %s could not be served now and stays pending: %s", request_id, exc)
            raise

    def _serve(self, action: str, request: UnlearningRequest, request_id: int, arrays: ArrayRecord) -> ArrayRecord:
        index = len(self.record.requests)
        before = self.forgotten
        after = before.after(action, request)
        excluded = before.classes | after.classes | (set(request.targets) if request.kind == "class" else set())

        def split(model: ArrayRecord) -> SplitAccuracy:
            return request_split(self.evaluator, self.grid, self.federation, model, request, excluded,
                                 before.clients | after.clients)

        entry: dict[str, Any] = {"index": index, "id": request_id, "action": action, **request.as_dict(),
                                 "label": request.label, "run": self.run_index}
        if self.method.global_model:  # else the method's stages report the clients' own evaluation
            entry["before"] = split(arrays).as_dict()
        if action == UNLEARN and self.method.global_model and not self.context.training_participants(after):
            log(INFO, "%s leaves no data to keep: the model goes back to its initialisation, Retrain-Or's answer",
                request.label)
            entry["exact"] = NOTHING_LEFT
            plans = [StagePlan(lambda: ResetStage(self.context.initial_model), 1)]
        else:
            plans = (self.method.unlearn(self.context, request, before, after, arrays)
                     if action == UNLEARN else self.method.relearn(self.context, request, after))
        for plan in plans:
            if plan.rounds == 0:
                continue
            stage = plan.build()
            if plan.needed is not None and not plan.needed():
                log(INFO, "Stage %s skipped: the stages before it left nothing for it to do", stage.stage_name)
                entry.setdefault("skipped", []).append(stage.stage_name)
                continue
            start = plan.start(arrays) if plan.start else arrays
            arrays = self.run_stage(stage, start, plan.rounds, request=index,
                                    split=split if self.method.global_model else None)
            record = self.record.stages[-1]
            entry[f"after-{record.name}"] = record.split.as_dict() if record.split else None
            entry.setdefault("seconds", {})[record.name] = record.seconds
            entry.setdefault("samples", {})[record.name] = record.samples
            if getattr(stage, "left_out", None):  # clients that failed in a round and were left out of it
                entry.setdefault("left-out", {})[record.name] = stage.left_out
        entry["total-seconds"] = sum(entry.setdefault("seconds", {}).values())
        entry.setdefault("samples", {})
        train_seconds = self.record.stage_seconds("train")
        entry["fraction-of-training"] = entry["total-seconds"] / train_seconds if train_seconds else None
        self.forgotten = after
        self._commit(arrays, request_id, entry)
        return arrays

    # ----------------------------------------------------------------- records
    def _commit(self, arrays: ArrayRecord, request_id: int, entry: dict[str, Any]) -> None:
        """Record the request in results.json, then save the model, then mark it served in the ledger."""
        self.record.requests.append(entry)
        write_results(self.output_path, self.record)
        served = {**entry, "lineage": self.lineage, "method": self.method.name,
                  "model-after": model_digest(arrays.to_torch_state_dict()), "mia": None}
        self.ledger.commit(request_id, served,
                           lambda count, stamp: self.save_model(arrays, log_entries=count, last_log_entry=stamp))
        log(INFO, "Served: %s %s (request %s): %s", entry["action"], entry["label"], request_id, entry_summary(entry))

    def _trained_by(self, partitions: list[int] | None) -> None:
        """Note the partitions that trained the current model (None: all); a method drawing on stores uses only them."""
        self.trained_partitions = partitions
        if self.method.data == protocol.SYNTHETIC and partitions is not None:
            self.context = replace(self.context, store_holders=frozenset(partitions))

    def save_model(self, arrays: ArrayRecord, name: str = CHECKPOINT_FILE, log_entries: int = 0,
                   last_log_entry: dict[str, Any] | None = None) -> Path:
        """Checkpoint the global model with what identifies it and the request state it reflects."""
        metadata = {"dataset": self.config.dataset, "model": self.model_spec.as_dict(),
                    "global-model": self.method.global_model, "experiment": self.config.experiment,
                    "lineage": self.lineage, "log-entries": log_entries, "last-log-entry": last_log_entry or {},
                    "trained-partitions": self.trained_partitions}
        return save_checkpoint(self.output_path, arrays.to_torch_state_dict(), metadata, name)

    def _record_stores(self, metrics_by_node: dict[int, Mapping[str, Any]]) -> None:
        clients = [self.federation.clients[node] for node in self.federation.node_ids]
        self.record.stores = {**self.record.stores, **stores_summary(clients, metrics_by_node, self.config.scale)}

    def finish(self) -> None:
        """Write the final results and the per-class accuracy plot."""
        write_results(self.output_path, self.record)
        classes = [str(index) for index in range(self.spec.num_classes)]
        plot = plot_class_accuracy(self.output_path, self.evaluator.history, classes)
        log(INFO, "Results in %s (plot %s)", self.output_path, plot.name)


def run_phase(grid: Grid, config: RunConfig, method: UnlearningMethod) -> Experiment:
    """Everything a run does for its ``phase`` (see the module docstring) with ``method``
    (the ServerApp passes the one the ``method`` setting names)."""
    if config.client_models and method.global_model:
        raise ConfigError(f"client-models={config.client_models!r} gives each client a model of its own, which "
                          f"method={config.method!r} (one global model) cannot use: set it empty, or use hdus")
    experiment = Experiment(for_short_rounds(grid), config, method)
    with experiment.ledger.serving():
        steps = experiment.record_requests(experiment.plan())
        arrays = experiment.train() if config.phase in ("all", "train") else experiment.load_model()
        for action, request, request_id in steps:
            arrays = experiment.serve(action, request, request_id, arrays)
        experiment.finish()
    return experiment


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
