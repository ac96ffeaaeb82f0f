"""The server side of a run: discover the federation, check the requests, run the stages, record them.

``phase`` picks the work:

- ``all``: train with distillation, serve every request (unlearn + recover), then
  relearn the last request (when ``relearn-rounds`` > 0);
- ``train``: train with distillation only (the clients keep their stores);
- ``unlearn``: load the current model and the clients' stores, serve the requests;
- ``relearn``: load them and relearn forgotten classes or clients (those named by
  ``forget-class`` / ``forget-client``, else the latest request still in force).

Every request is checked against the federation, the stores and the record of
requests before any stage runs, so a bad request changes nothing.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from .config import RunConfig
from .data import dataset_spec
from .distillation import synthetic_count
from .errors import RequestError, StageFailedError
from .evaluation import ServerEvaluator, SplitAccuracy, class_split, client_split
from .federation import ClientInfo, Federation, discover_federation
from .models import ModelSpec, build_model
from .results import (
    TRAINED_CHECKPOINT_FILE,
    ExperimentRecord,
    StageRecord,
    load_checkpoint,
    plot_class_accuracy,
    save_checkpoint,
    write_results,
)
from .baselines import (
    FedEraserCalibration,
    FUMPPruning,
    PrunedRecovery,
    RetrainStrategy,
    S2UStrategy,
    UpdateHistory,
)
from .strategies import (
    NUM_EXAMPLES,
    QuickDropTraining,
    RecoverStrategy,
    RelearnStrategy,
    StageStrategy,
    TrainingStrategy,
    UnlearnStrategy,
)
from .training import resolve_device
from .unlearning_requests import RequestLog, UnlearningRequest


@dataclass(frozen=True)
class StagePlan:
    """A stage to run: how to build its strategy (when it starts), its rounds, and the model
    it starts from (``None``: the current one)."""

    build: Callable[[], StageStrategy]
    rounds: int
    start: Callable[[ArrayRecord], ArrayRecord] | None = None


@dataclass
class Forgotten:
    """Classes and clients (partition ids) forgotten at some point of the run."""

    classes: set[int]
    clients: set[int]

    def after(self, action: str, request: UnlearningRequest) -> Forgotten:
        """The state once ``action`` (unlearn or relearn) has served ``request``."""
        classes, clients = set(self.classes), set(self.clients)
        changed = classes if request.kind == "class" else clients
        if action == "unlearn":
            changed |= set(request.targets)
        else:
            changed -= set(request.targets)
        return Forgotten(classes, clients)

    def holds(self, request: UnlearningRequest) -> set[int]:
        """The targets of ``request`` that are forgotten now."""
        return set(request.targets) & (self.classes if request.kind == "class" else self.clients)


class Experiment:  # pylint: disable=too-many-instance-attributes
    """One run's stages over one federation, and the records they leave."""

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid = grid
        self.config = config
        self.output_path: Path = config.output_path
        self.spec = dataset_spec(config.dataset)
        self.model_spec = ModelSpec.from_config(config)
        self.rng = random.Random(config.seed)
        random.seed(config.seed)
        self.federation: Federation = discover_federation(grid, ConfigRecord())
        self.evaluator = ServerEvaluator(config, resolve_device(config.device))
        self.log = RequestLog(self.output_path)
        self.lineage = ""
        self.checkpoint: dict[str, Any] = {}
        self.forgotten = Forgotten(set(), set())
        self.record = ExperimentRecord(config=config.resolved_run_config())
        self.run_index = 0

    # ----------------------------------------------------------------- planning
    def plan(self) -> list[tuple[str, UnlearningRequest]]:
        """The (action, request) pairs this run serves, checked against the federation,
        the stored state and the stores; raises :class:`RequestError` before any work."""
        config = self.config
        requests = config.requests()
        for request in requests:
            if request.kind == "client":
                self._check_client_ids(request)
        if config.phase == "train":
            return []
        if config.phase == "all":
            plan = [("unlearn", request) for request in requests]
            if requests and config.relearn_rounds > 0:
                plan.append(("relearn", requests[-1]))
        else:
            self._load_state()
            plan = self._plan_from_state(requests)
        state = self.forgotten
        participants: set[int] = set()
        for action, request in plan:
            self._check_action(action, request, state)
            participants |= set(self._stage_participants(action, request, state))
            state = state.after(action, request)
        if config.phase != "all" and config.method == "quickdrop":
            self._check_stores(participants)
        return plan

    def _plan_from_state(self, requests: list[UnlearningRequest]) -> list[tuple[str, UnlearningRequest]]:
        if self.config.phase == "unlearn":
            if not requests:
                raise RequestError("phase=unlearn needs a request: set forget-class or forget-client")
            return [("unlearn", request) for request in requests]
        if requests:
            return [("relearn", request) for request in requests]
        latest = next(
            (
                entry for entry in reversed(self.log.entries(self.lineage))
                if entry["action"] == "unlearn" and self.forgotten.holds(UnlearningRequest.from_dict(entry))
            ),
            None,
        )
        if latest is None:
            raise RequestError("phase=relearn: nothing is forgotten, so there is nothing to relearn")
        return [("relearn", UnlearningRequest.from_dict(latest))]

    def _check_client_ids(self, request: UnlearningRequest) -> None:
        size = self.federation.num_partitions
        bad = [t for t in request.targets if t >= size]
        if bad:
            raise RequestError(
                f"invalid setting forget-client={self.config.forget_client!r}: client {bad[0]} does not exist "
                f"(the federation has clients 0-{size - 1})"
            )

    def _check_method(self, action: str, request: UnlearningRequest) -> None:
        """Refuse what the run's method cannot do."""
        method = self.config.method
        if method == "fu-mp" and request.kind == "client":
            raise RequestError("method fu-mp unlearns classes only (it prunes class-specific channels): "
                               "use forget-class, or another method for forget-client")
        if method == "fu-mp" and action == "relearn":
            raise RequestError("method fu-mp cannot relearn: its pruning is irreversible "
                               "(set relearn-rounds=0 with phase=all)")
        if method == "s2u" and request.kind == "class":
            raise RequestError("method s2u unlearns clients only: use forget-client (and forget-class='')")
        if method == "federaser" and action == "unlearn":
            if self.config.phase == "all" and not self.config.federaser_interval:
                raise RequestError("method federaser needs the client updates recorded during training: "
                                   "set federaser-interval (e.g. 2)")
            history = self.history()
            if self.config.phase != "all" and not history.rounds():
                raise RequestError(f"method federaser needs the client updates recorded during training, and "
                                   f"{history.folder} has none: train with federaser-interval (e.g. 2)")

    def _check_action(self, action: str, request: UnlearningRequest, state: Forgotten) -> None:
        self._check_method(action, request)
        if action == "unlearn":
            already = state.holds(request)
            if already:
                raise RequestError(
                    f"{request.label}: {request.kind} {sorted(already)[0]} is already forgotten (relearn it first)"
                )
            if request.kind == "class" and not self._holders(request.targets, state):
                raise RequestError(f"{request.label}: no remaining client holds data of it")
        elif state.holds(request) != set(request.targets):
            missing = sorted(set(request.targets) - state.holds(request))
            raise RequestError(f"cannot relearn {request.label}: {request.kind} {missing[0]} is not forgotten")

    def _check_stores(self, nodes: set[int]) -> None:
        problems = [
            f"partition {info.partition_id}: {info.store_status}"
            for info in (self.federation.clients[node] for node in sorted(nodes))
            if info.store_status != "ok"
        ]
        if problems:
            raise RequestError(
                "the synthetic stores needed to serve the request are not usable: " + "; ".join(problems)
            )

    def _load_state(self) -> None:
        """Current model's lineage and forgotten state, the earlier results, a repaired log."""
        checkpoint = self.checkpoint = self._checkpoint()
        self.lineage = checkpoint["lineage"]
        entries = self.log.entries(self.lineage)
        if len(entries) < checkpoint["log-entries"]:  # a crash came between saving the model and the log
            self.log.append_entry(checkpoint["last-log-entry"])
        self.forgotten = Forgotten(*self.log.forgotten(self.lineage))
        previous = ExperimentRecord.load(self.output_path)
        if previous is not None and previous.runs and previous.runs[0].get("lineage") == self.lineage:
            previous.config = self.record.config
            self.record = previous
            self.evaluator.history = list(previous.rounds)

    def _checkpoint(self) -> dict[str, Any]:
        checkpoint = load_checkpoint(self.output_path)
        expected = {"dataset": self.config.dataset, "model": self.model_spec.as_dict()}
        for key, value in expected.items():
            if checkpoint.get(key) != value:
                raise RequestError(
                    f"the model in {self.output_path} was trained with {key} {checkpoint.get(key)!r}, "
                    f"this run has {value!r}"
                )
        return checkpoint

    # ------------------------------------------------------------ participants
    def _holders(self, classes: tuple[int, ...], state: Forgotten) -> list[int]:
        return self.federation.nodes_where(
            lambda c: c.partition_id not in state.clients and any(c.class_counts[k] for k in classes)
        )

    def _stage_participants(self, action: str, request: UnlearningRequest, state: Forgotten) -> list[int]:
        """Every node that takes part in serving ``request`` from ``state``."""
        if action == "unlearn":
            targets = self._unlearn_participants(request, state)
            return targets + self._training_participants(state.after(action, request))
        return self._training_participants(state.after(action, request))

    def _unlearn_participants(self, request: UnlearningRequest, state: Forgotten) -> list[int]:
        if request.kind == "class":
            return self._holders(request.targets, state)
        return [self.federation.node_of(target) for target in request.targets]

    def _training_participants(self, state: Forgotten) -> list[int]:
        """Clients not forgotten that hold data of a class not forgotten."""

        def has_data(client: ClientInfo) -> bool:
            return any(n for c, n in enumerate(client.class_counts) if c not in state.classes)

        return self.federation.nodes_where(lambda c: c.partition_id not in state.clients and has_data(c))

    # ------------------------------------------------------------------ stages
    def run_stage(
        self,
        strategy: StageStrategy,
        arrays: ArrayRecord,
        num_rounds: int,
        request: int | None = None,
        split: Callable[[ArrayRecord], SplitAccuracy] | None = None,
    ) -> ArrayRecord:
        """Run one stage for ``num_rounds`` rounds, record it, and return the new global model."""
        name = strategy.stage_name
        eval_seconds_before = self.evaluator.seconds
        first_round = self.evaluator.last_round + 1
        result = strategy.start(
            grid=self.grid, initial_arrays=arrays, num_rounds=num_rounds, evaluate_fn=self.evaluator.for_stage(name)
        )
        if len(result.arrays) > 0:
            arrays = result.arrays
        last = self.evaluator.history[-1]
        stage = StageRecord(
            name=name, rounds=strategy.rounds, seconds=strategy.seconds,
            eval_seconds=self.evaluator.seconds - eval_seconds_before, samples=strategy.samples,
            sample_gradients=strategy.sample_gradients, accuracy=last.accuracy, class_accuracy=last.class_accuracy,
            first_round=first_round, last_round=last.round, run=self.run_index, request=request,
            split=split(arrays) if split else None, bytes=strategy.bytes_sent + strategy.bytes_received,
            compute_seconds=strategy.compute_seconds, distill_seconds=strategy.distill_seconds,
        )
        self.record.stages.append(stage)
        self.record.rounds = list(self.evaluator.history)
        write_results(self.output_path, self.record)
        log(
            INFO,
            "Stage %s: %s rounds in %.2f s (+%.1f s evaluation), %s samples, test accuracy %.2f%%%s",
            name, stage.rounds, stage.seconds, stage.eval_seconds, stage.samples, 100 * stage.accuracy,
            _split_text(stage.split),
        )
        return arrays

    def _stage_settings(self, prefix: str, epochs: int | None = None) -> dict[str, Any]:
        config = self.config
        return {
            "lr": getattr(config, f"{prefix}_lr"),
            "epochs": epochs or getattr(config, f"{prefix}_epochs"),
            "batch_size": config.batch_size,
            "momentum": config.momentum,
        }

    def start_run(self) -> None:
        """Record this run (phase, time, lineage) in results.json's ``runs``."""
        self.run_index = len(self.record.runs)
        self.record.runs.append(
            {
                "phase": self.config.phase,
                "started-at": _now(),
                "lineage": self.lineage,
                "config": self.config.resolved_run_config(),
            }
        )

    def train(self) -> ArrayRecord:
        """Federated training (new lineage): with in-situ distillation into new stores for
        QuickDrop, plain FedAvg for the baselines; FedEraser's history when configured."""
        config = self.config
        self.lineage = f"{_now()}-{uuid.uuid4().hex[:8]}"
        self.start_run()
        self.record.federation = {
            "num-partitions": self.federation.num_partitions,
            "class-counts": [list(self.federation.clients[n].class_counts) for n in self.federation.node_ids],
        }
        history = self.history()
        for stale in history.folder.glob("round-*.pt"):  # updates of an earlier trained model
            stale.unlink()
        settings = {**self._training_settings(), "fraction_train": config.fraction_train, "rng": self.rng,
                    "on_round": self._record_history if config.federaser_interval else None}
        if config.method == "quickdrop":
            strategy: StageStrategy = QuickDropTraining(
                self.federation, num_rounds=config.num_server_rounds, distill_lr=config.distill_lr,
                distill_momentum=config.distill_momentum, distill_batch=config.distill_batch,
                finetune_steps=config.finetune_steps, **settings,
            )
        else:
            strategy = TrainingStrategy(self.federation, **settings)
        initial = ArrayRecord(build_model(self.model_spec, seed=config.seed).state_dict())
        arrays = self.run_stage(strategy, initial, config.num_server_rounds)
        self._record_stores({node: int(m.get("store-bytes", 0)) for node, m in strategy.last_metrics.items()})
        self.save_model(arrays, TRAINED_CHECKPOINT_FILE)
        self.save_model(arrays)
        return arrays

    def load_model(self) -> ArrayRecord:
        """The current global model of this experiment (checked in :meth:`plan`)."""
        self.start_run()
        self._record_stores({node: info.store_bytes for node, info in self.federation.clients.items()})
        return ArrayRecord(self.checkpoint["state-dict"])

    def serve(self, action: str, request: UnlearningRequest, arrays: ArrayRecord) -> ArrayRecord:
        """Unlearn (then recover) or relearn one request; record it and save the model."""
        log(INFO, "%s %s", action.capitalize(), request.label)
        index = len(self.record.requests)
        state = self.forgotten
        after = state.after(action, request)
        if action == "unlearn" and len(after.classes) == self.spec.num_classes:
            log(WARNING, "%s leaves no class to keep: no data is left to recover on, and where the model predicts "
                "the class everywhere with a large margin, gradient ascent finds almost no gradient and the class "
                "may stay (README: Unlearning)", request.label)
        excluded = state.classes | after.classes | (set(request.targets) if request.kind == "class" else set())

        def split(model: ArrayRecord) -> SplitAccuracy:
            return self._split(model, request, excluded, state.clients | after.clients)

        entry: dict[str, Any] = {"index": index, "action": action, **request.as_dict(), "label": request.label,
                                 "run": self.run_index, "before": split(arrays).as_dict()}
        plans = self._unlearning_plan(request, state, after, arrays) if action == "unlearn" else [self._relearn_stage(
            request, after)]
        for plan in plans:
            if plan.rounds == 0:
                continue
            strategy = plan.build()
            start = plan.start(arrays) if plan.start else arrays
            arrays = self.run_stage(strategy, start, plan.rounds, request=index, split=split)
            stage = self.record.stages[-1]
            entry[f"after-{stage.name}"] = stage.split.as_dict() if stage.split else None
            entry.setdefault("seconds", {})[stage.name] = stage.seconds
            entry.setdefault("samples", {})[stage.name] = stage.samples
        entry["total-seconds"] = sum(entry["seconds"].values())
        train_seconds = self.record.stage_seconds("train")
        entry["fraction-of-training"] = entry["total-seconds"] / train_seconds if train_seconds else None
        self.forgotten = after
        self._commit(arrays, action, request, entry)
        return arrays

    # ------------------------------------------------------------- methods
    def _unlearning_plan(
        self, request: UnlearningRequest, state: Forgotten, after: Forgotten, arrays: ArrayRecord
    ) -> list[StagePlan]:
        """The stages that serve an unlearning request with the run's ``method`` from the model ``arrays``."""
        config, federation = self.config, self.federation
        method = config.method
        retained = self._training_participants(after)
        data = self._stage_data
        recover = StagePlan(
            lambda: RecoverStrategy(federation, participants=retained, exclude_classes=sorted(after.classes),
                                    data=data, **self._stage_settings("recover")),
            config.recover_rounds if retained else 0,
        )
        if method in ("quickdrop", "sga"):
            epochs = None if request.kind == "class" else config.unlearn_client_epochs
            target_losses = self.evaluator.class_losses(arrays) if request.kind == "client" and method == "sga" else None
            unlearn = StagePlan(
                lambda: UnlearnStrategy(
                    federation, participants=self._unlearn_participants(request, state),
                    forget_classes=list(request.targets) if request.kind == "class" else None,
                    data=data, target_losses=target_losses, **self._stage_settings("unlearn", epochs)),
                config.unlearn_rounds if request.kind == "class" else 1,
            )
            return [unlearn, recover]
        if method == "retrain":
            return [StagePlan(
                lambda: RetrainStrategy(federation, participants=retained, exclude_classes=sorted(after.classes),
                                        **self._training_settings()),
                config.num_server_rounds,
                start=lambda _: ArrayRecord(build_model(self.model_spec, seed=config.seed).state_dict()),
            )]
        if method == "federaser":
            history = self.history()
            stored_rounds = history.rounds()
            calibration = StagePlan(
                lambda: FedEraserCalibration(
                    federation, history=history, participants=retained, exclude_classes=sorted(after.classes),
                    **{**self._training_settings(), "epochs": math.ceil(config.federaser_ratio * config.local_epochs)}),
                len(stored_rounds),
                start=lambda _: ArrayRecord(history.load(stored_rounds[0])["global"]),
            )
            return [calibration, recover]
        if method == "fu-mp":
            pruning = FUMPPruning(federation, model=build_model(self.model_spec),
                                  participants=federation.nodes_where(lambda c: c.partition_id not in state.clients),
                                  forget_classes=list(request.targets), prune_fraction=config.prune_fraction,
                                  prune_target=config.prune_target)
            recovery = StagePlan(
                lambda: PrunedRecovery(federation, participants=retained, exclude_classes=sorted(after.classes),
                                       layers=pruning.layers, pruned=pruning.pruned, data=data,
                                       **self._stage_settings("recover")),
                recover.rounds,
            )
            return [StagePlan(lambda: pruning, 1), recovery]
        forgotten_nodes = [federation.node_of(target) for target in request.targets]
        return [StagePlan(
            lambda: S2UStrategy(federation, participants=sorted(set(retained) | set(forgotten_nodes)),
                                forgotten_nodes=forgotten_nodes, scale=config.s2u_scale,
                                exclude_classes=sorted(after.classes), **self._training_settings()),
            1 + config.recover_rounds,
        )]

    @property
    def _stage_data(self) -> str:
        """What the clients' stages draw from: their synthetic stores (QuickDrop) or their
        original data (the baselines)."""
        return "synthetic" if self.config.method == "quickdrop" else "original"

    def _relearn_stage(self, request: UnlearningRequest, after: Forgotten) -> StagePlan:
        return StagePlan(
            lambda: RelearnStrategy(
                self.federation, participants=self._training_participants(after),
                exclude_classes=sorted(after.classes),
                relearn_classes=list(request.targets) if request.kind == "class" else [],
                data=self._stage_data,
                **self._stage_settings("relearn")),
            self.config.relearn_rounds,
        )

    def _training_settings(self) -> dict[str, Any]:
        config = self.config
        return {"lr": config.lr, "epochs": config.local_epochs, "max_steps": config.local_steps,
                "batch_size": config.batch_size, "momentum": config.momentum, "weight_decay": config.weight_decay}

    def history(self) -> UpdateHistory:
        """FedEraser's record of client updates, kept beside the experiment's outputs."""
        return UpdateHistory(self.output_path / "federaser", self.config.federaser_interval)

    def _split(self, arrays: ArrayRecord, request: UnlearningRequest, excluded_classes: set[int],
               forgotten_clients: set[int]) -> SplitAccuracy:
        """F-Set/R-Set accuracy of a model for ``request`` (class-level: test set; client-level: client data)."""
        if request.kind == "class":
            classes = self.evaluator.evaluate(arrays)[1]
            return class_split(classes, self.evaluator.class_sizes, set(request.targets), excluded_classes)
        correct, totals = self.evaluate_on_clients(arrays)
        return client_split(correct, totals, set(request.targets), forgotten_clients)

    def evaluate_on_clients(self, arrays: ArrayRecord) -> tuple[dict[int, float], dict[int, int]]:
        """Every client's correct predictions and sample count on its own training data."""
        messages = [
            Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in self.federation.node_ids
        ]
        correct, totals = {}, {}
        for reply in self.grid.send_and_receive(messages):
            if reply.has_error():
                raise StageFailedError(f"client evaluation failed: {reply.error.reason}")
            metrics = reply.content["metrics"]
            partition = self.federation.partition_of(reply.metadata.src_node_id)
            correct[partition], totals[partition] = float(metrics["correct"]), int(metrics["num-examples"])
        return correct, totals

    def _commit(self, arrays: ArrayRecord, action: str, request: UnlearningRequest, entry: dict[str, Any]) -> None:
        """Save the model first, then append to the log (a crash in between is repaired on load)."""
        logged = {**entry, "lineage": self.lineage, "served-at": _now()}
        self.record.requests.append(entry)
        write_results(self.output_path, self.record)
        self.save_model(arrays, log_entries=len(self.log.entries(self.lineage)) + 1, last_log_entry=logged)
        self.log.append_entry(logged)
        log(INFO, "Served: %s %s: %s", action, request.label, _entry_text(entry))

    def save_model(self, arrays: ArrayRecord, name: str | None = None, log_entries: int = 0,
                   last_log_entry: dict[str, Any] | None = None) -> Path:
        """Checkpoint the global model with what identifies it and the request state it reflects."""
        metadata = {
            "dataset": self.config.dataset,
            "model": self.model_spec.as_dict(),
            "experiment": self.config.experiment,
            "lineage": self.lineage,
            "log-entries": log_entries,
            "last-log-entry": last_log_entry or {},
        }
        state_dict = arrays.to_torch_state_dict()
        if name:
            return save_checkpoint(self.output_path, state_dict, metadata, name)
        return save_checkpoint(self.output_path, state_dict, metadata)

    def _record_history(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> None:
        """FedEraser: store every client's update of this round if it is a recorded one."""
        history = self.history()
        if not history.records(server_round):
            return
        global_model = sent.to_torch_state_dict()
        updates, num_examples = {}, {}
        for reply in replies:
            partition = self.federation.partition_of(reply.metadata.src_node_id)
            model = reply.content["arrays"].to_torch_state_dict()
            updates[partition] = {key: model[key] - global_model[key] for key in model}
            num_examples[partition] = int(reply.content["metrics"][NUM_EXAMPLES])
        history.save(server_round, global_model, updates, num_examples)
        self.record.stores["federaser-bytes"] = history.size_bytes()

    def _record_stores(self, bytes_by_node: dict[int, int]) -> None:
        scale = self.config.scale
        clients = [self.federation.clients[node] for node in self.federation.node_ids]
        synthetic = [sum(synthetic_count(n, scale) for n in c.class_counts if n) for c in clients]
        data = sum(c.num_examples for c in clients)
        self.record.stores = {
            **self.record.stores,
            "bytes": [bytes_by_node.get(c.node_id, 0) for c in clients],
            "synthetic-images": synthetic,
            "augmentation-images": synthetic,
            "synthetic-fraction": sum(synthetic) / data if data else 0.0,
        }

    def finish(self) -> None:
        """Write the final results and the per-class accuracy plot."""
        write_results(self.output_path, self.record)
        classes = [str(index) for index in range(self.spec.num_classes)]
        plot = plot_class_accuracy(self.output_path, self.evaluator.history, classes)
        log(INFO, "Results in %s (plot %s)", self.output_path, plot.name)


def run_phase(grid: Grid, config: RunConfig) -> Experiment:
    """Everything a run does for its ``phase`` (see the module docstring)."""
    experiment = Experiment(grid, config)
    plan = experiment.plan()
    arrays = experiment.train() if config.phase in ("all", "train") else experiment.load_model()
    for action, request in plan:
        arrays = experiment.serve(action, request, arrays)
    experiment.finish()
    return experiment


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _split_text(split: SplitAccuracy | None) -> str:
    if split is None:
        return ""
    return f", F-Set {_percent(split.forget)}, R-Set {_percent(split.retain)}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _entry_text(entry: dict[str, Any]) -> str:
    parts = [f"before F {_percent(entry['before']['forget-accuracy'])} R {_percent(entry['before']['retain-accuracy'])}"]
    for key, value in entry.items():
        if key.startswith("after-") and value:
            parts.append(f"{key} F {_percent(value['forget-accuracy'])} R {_percent(value['retain-accuracy'])}")
    parts.append(f"{entry['total-seconds']:.2f} s")
    return "; ".join(parts)
