"""Where a client's QuickDrop training step spends its time, on the CPU preset's data and model.

    python -m qd_app.bench.profile [--partition 4] [--steps 40] [--repeats 2] [--ops] [--flops] [--data-dir DIR]

Runs ``--steps`` local steps of the run config's defaults (batch, model, distillation) on one
client's partition three ways, one after another in this process: plain FedAvg SGD, QuickDrop
with the classes matched one by one, and QuickDrop with the classes matched in one batched
computation (the app's path). Prints seconds per step, the synthetic-image share, and with
``--ops`` the operators that took longest (torch.profiler). A timing: run it alone.

``--flops`` counts arithmetic instead of time (``torch.utils.flop_counter``: the multiply-adds
of convolutions and matrix products, forward, backward and the matching's double backward) on
every client's partition, and the synthetic-image share of it over the federation, each client
weighted by its steps per epoch. Class by class is the least arithmetic the matching does: where
time follows arithmetic, no implementation of these settings spends a smaller share of its time.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import RunConfig
from ..core.data import load_split, partition_indices
from ..core.distillation import initial_synthetic_set, train_with_distillation
from ..core.models import ModelSpec, build_model
from ..core.training import make_optimizer, seeded_generator, train_epochs
from .suites import NUM_CLIENTS


def _step(kind: str, model: torch.nn.Module, data, synthetic, config: RunConfig, steps: int) -> tuple[float, float]:
    """Wall seconds of ``steps`` local steps of ``kind``, and of them the synthetic-image work."""
    optimizer = make_optimizer(model, config.lr, config.momentum)
    generator = seeded_generator(config.seed, 1)
    started = time.perf_counter()
    if kind == "plain SGD (FedAvg)":
        train_epochs(model, data, optimizer=optimizer, epochs=1, batch_size=config.batch_size, generator=generator,
                     max_steps=steps)
        return time.perf_counter() - started, 0.0
    stats = train_with_distillation(
        model, data, synthetic, optimizer=optimizer, image_lr=config.distill_lr,
        image_momentum=config.distill_momentum, image_batch=config.distill_batch, epochs=1,
        batch_size=config.batch_size, generator=generator, max_steps=steps, batched=kind.endswith("batched"))
    return time.perf_counter() - started, stats.distill_seconds


KINDS = ("plain SGD (FedAvg)", "QuickDrop, classes one by one", "QuickDrop, classes batched")


def _flops(model: torch.nn.Module, data, synthetic, config: RunConfig, steps: int) -> dict[str, float]:
    """Multiply-adds (FLOPs) per step of each kind of :data:`KINDS`."""
    counted = {}
    for kind in KINDS:
        with FlopCounterMode(display=False) as counter:
            _step(kind, copy.deepcopy(model), data, copy.deepcopy(synthetic), config, steps)
        counted[kind] = counter.get_total_flops() / steps
    return counted


def _print_flops(config: RunConfig, train, model: torch.nn.Module, steps: int) -> None:
    """Per partition and over the federation: FLOPs per step and the synthetic-image share."""
    print("| client | samples | plain SGD (MFLOP per step) | one by one | batched | synthetic share, one by one "
          "| synthetic share, batched |")
    print("|" + " --- |" * 7)
    totals, samples, epoch_steps = dict.fromkeys(KINDS, 0.0), 0, 0
    for partition, indices in enumerate(partition_indices(config, NUM_CLIENTS)):
        data = train.subset(indices)
        synthetic = initial_synthetic_set(data, config.scale, seeded_generator(config.seed, 0))
        counted = _flops(model, data, synthetic, config, steps)
        samples, weight = samples + len(data), math.ceil(len(data) / config.batch_size)
        epoch_steps += weight
        for kind, flops in counted.items():
            totals[kind] += weight * flops
        print(_flops_row(f"partition {partition}", len(data), counted))
    print(_flops_row("federation (mean step of an epoch)", samples,
                     {kind: flops / max(epoch_steps, 1) for kind, flops in totals.items()}))


def _flops_row(name: str, samples: int, counted: dict[str, float]) -> str:
    return (f"| {name} | {samples} | " + " | ".join(f"{counted[kind] / 1e6:.0f}" for kind in KINDS)
            + "".join(f" | {100 * _share(counted, kind):.1f} %" for kind in KINDS[1:]) + " |")


def _share(counted: dict[str, float], kind: str) -> float:
    """The part of ``kind``'s arithmetic that plain SGD's step does not do (0 for no steps)."""
    return (counted[kind] - counted[KINDS[0]]) / counted[kind] if counted[kind] else 0.0


def main(argv: list[str] | None = None) -> None:
    """Time the three kinds of local step (or, with ``--flops``, count their arithmetic) and print a table."""
    parser = argparse.ArgumentParser(prog="python -m qd_app.bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition", type=int, default=4, help="the client (partition id of 10) to profile")
    parser.add_argument("--steps", type=int, default=40, help="local steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each kind (the best is shown)")
    parser.add_argument("--ops", action="store_true", help="also list the slowest operators of the batched step")
    parser.add_argument("--flops", action="store_true",
                        help="count arithmetic (FLOPs) on every partition instead of timing one")
    parser.add_argument("--data-dir", default="", help="the data-dir setting (default: the app's)")
    args = parser.parse_args(argv)
    config = RunConfig.from_run_config({"data-dir": args.data_dir})
    train = load_split(config.dataset, config.data_path, True)
    model = build_model(ModelSpec.from_config(config), seed=config.seed)
    if args.flops:
        _print_flops(config, train, model, args.steps)
        return
    data = train.subset(partition_indices(config, NUM_CLIENTS)[args.partition])
    synthetic = initial_synthetic_set(data, config.scale, seeded_generator(config.seed, 0))
    print(f"partition {args.partition}: {len(data)} samples, classes {data.class_counts(10)}; "
          f"{args.steps} steps of batch {config.batch_size}, distill-batch {config.distill_batch}, "
          f"{torch.get_num_threads()} torch threads")
    _step(KINDS[2], copy.deepcopy(model), data, copy.deepcopy(synthetic), config, 3)  # warm-up
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for kind in KINDS:
            seconds, distill = _step(kind, copy.deepcopy(model), data, copy.deepcopy(synthetic), config, args.steps)
            if kind not in best or seconds < best[kind][0]:
                best[kind] = seconds, distill
    print("| local step | ms per step | of which synthetic images (ms) | synthetic share |")
    print("| --- | --- | --- | --- |")
    for kind, (seconds, distill) in best.items():
        print(f"| {kind} | {1000 * seconds / args.steps:.1f} | {1000 * distill / args.steps:.1f} | "
              f"{100 * distill / seconds:.1f} % |")
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            _step(KINDS[2], copy.deepcopy(model), data, copy.deepcopy(synthetic), config, args.steps)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
