"""The server side of a run: discover the federation, run the stages, write the outputs."""

from __future__ import annotations

import random
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from .config import RunConfig
from .data import dataset_spec
from .evaluation import ServerEvaluator
from .federation import Federation, discover_federation
from .models import ModelSpec, build_model
from .results import ExperimentRecord, StageRecord, plot_class_accuracy, save_checkpoint, write_results
from .strategies import StageStrategy, TrainingStrategy
from .training import resolve_device


class Experiment:
    """One run's stages over one federation, and the records they leave."""

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid = grid
        self.config = config
        self.output_path: Path = config.output_path
        self.output_path.mkdir(parents=True, exist_ok=True)
        random.seed(config.seed)
        self.federation: Federation = discover_federation(grid, ConfigRecord())
        self.evaluator = ServerEvaluator(config, resolve_device(config.device))
        self.record = ExperimentRecord(
            config=config.resolved_run_config(),
            federation={
                "num-partitions": self.federation.num_partitions,
                "class-counts": [
                    list(self.federation.clients[node].class_counts) for node in self.federation.node_ids
                ],
            },
        )
        self.model_spec = ModelSpec.from_config(config)

    def initial_arrays(self) -> ArrayRecord:
        """A freshly initialised global model (seeded by ``seed``)."""
        return ArrayRecord(build_model(self.model_spec, seed=self.config.seed).state_dict())

    def run_stage(self, strategy: StageStrategy, arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """Run one stage for ``num_rounds`` rounds, record it, and return the new global model."""
        name = strategy.stage_name
        eval_seconds_before = self.evaluator.seconds
        first_round = self.evaluator.last_round + 1
        result = strategy.start(
            grid=self.grid,
            initial_arrays=arrays,
            num_rounds=num_rounds,
            evaluate_fn=self.evaluator.for_stage(name),
        )
        if len(result.arrays) > 0:
            arrays = result.arrays
        last = self.evaluator.history[-1]
        stage = StageRecord(
            name=name,
            rounds=num_rounds,
            seconds=strategy.seconds,
            eval_seconds=self.evaluator.seconds - eval_seconds_before,
            samples=strategy.samples,
            sample_gradients=strategy.sample_gradients,
            accuracy=last.accuracy,
            class_accuracy=last.class_accuracy,
            first_round=first_round,
            last_round=last.round,
        )
        self.record.stages.append(stage)
        self.record.rounds = list(self.evaluator.history)
        write_results(self.output_path, self.record)
        log(
            INFO,
            "Stage %s: %s rounds in %.1f s (+%.1f s evaluation), %s samples, test accuracy %.2f%%",
            name,
            num_rounds,
            stage.seconds,
            stage.eval_seconds,
            stage.samples,
            100 * stage.accuracy,
        )
        return arrays

    def save_model(self, arrays: ArrayRecord) -> Path:
        """Checkpoint the global model with what identifies it (dataset, architecture, experiment)."""
        metadata = {
            "dataset": self.config.dataset,
            "model": self.model_spec.as_dict(),
            "experiment": self.config.experiment,
        }
        return save_checkpoint(self.output_path, arrays.to_torch_state_dict(), metadata)

    def finish(self) -> None:
        """Write the final results and the per-class accuracy plot."""
        write_results(self.output_path, self.record)
        classes = [str(index) for index in range(dataset_spec(self.config.dataset).num_classes)]
        plot = plot_class_accuracy(self.output_path, self.evaluator.history, classes)
        log(INFO, "Results in %s (plot %s)", self.output_path, plot.name)


def run_training(grid: Grid, config: RunConfig) -> Experiment:
    """Federated training from scratch (FedAvg), with checkpoint, results and plot."""
    experiment = Experiment(grid, config)
    strategy = TrainingStrategy(
        experiment.federation, fraction_train=config.fraction_train, rng=random.Random(config.seed)
    )
    arrays = experiment.run_stage(strategy, experiment.initial_arrays(), config.num_server_rounds)
    experiment.save_model(arrays)
    experiment.finish()
    return experiment
