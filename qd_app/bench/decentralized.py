"""The decentralized suite: HDUS with homogeneous and heterogeneous clients against each client's
main model alone, FedAvg (QuickDrop's trained model) and QuickDrop's client unlearning.

Per seed: QuickDrop trains and unlearns the largest client, then the three largest at once;
HDUS trains each setup once over the full topology and unlearns the same clients (time and
bytes measured in the app). Accuracy for every topology, ensemble weight and set of forgotten
clients is computed here from the clients' stored repositories: a ring's or a k-regular
graph's ensemble is a subset of the full one's seed models, and forgetting is deleting them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..client.hdus import load_repository, repository_file, stored_model
from ..client.run import ClientRun
from ..config import RunConfig
from ..core.data import partition_indices
from ..core.hdus import ensemble_probabilities, neighbours, reference_and_evaluation
from .numbers import cell, mean_std
from .runner import run_logged
from .suites import EXPERIMENT, Suite
from .superlink import Link

HETEROGENEOUS = "convnet-s,convnet-m,convnet-l,mlp"
SETUPS = {"homogeneous": {"client-models": ""}, "heterogeneous": {"client-models": HETEROGENEOUS}}
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOPOLOGIES = {"ring": 2, "regular": 4, "full": 9}
FORGET_COUNTS = (0, 1, 3)  # clients forgotten: none, the largest, the three largest


def run_seed(link: Link, suite: Suite, seed: int, work: Path) -> dict[str, Any]:
    """One seed: QuickDrop's training and client unlearning, then every HDUS setup."""
    settings = {**suite.settings, "seed": seed, "experiment": EXPERIMENT, "forget-class": ""}
    config = RunConfig.from_run_config(settings)
    sizes = [len(part) for part in partition_indices(config, suite.clients)]
    largest = sorted(range(len(sizes)), key=lambda client: (-sizes[client], client))
    forgotten = {count: largest[:count] for count in FORGET_COUNTS if count}
    result: dict[str, Any] = {"seed": seed, "forgotten": {str(c): clients for c, clients in forgotten.items()}}
    result["quickdrop"] = _runs(link, suite, {**settings, "method": "quickdrop"}, work / "quickdrop", forgotten,
                                f"seed {seed}: QuickDrop")
    for setup, overrides in SETUPS.items():
        hdus = {**settings, **overrides, "method": "hdus", "hdus-topology": "full"}
        result[setup] = _runs(link, suite, hdus, work / setup, forgotten, f"seed {seed}: HDUS {setup}",
                              sweep=lambda stores, h=hdus: accuracy_sweep(h, stores, suite.clients, forgotten))
    return result


def _runs(link: Link, suite: Suite, settings: dict[str, Any], work: Path, forgotten: dict[int, list[int]],
          label: str, sweep=None) -> dict[str, Any]:
    """Train, then unlearn each set of clients from a copy of the trained experiment and its stores."""
    stores = work / "stores"
    for folder in (work / "train", stores):
        shutil.rmtree(folder, ignore_errors=True)
    trained = run_logged(link, suite, {**settings, "phase": "train", "output-dir": str(work / "train"),
                                       "store-dir": str(stores)}, f"{label} training")
    train = trained["stages"][0]
    row: dict[str, Any] = {"train-seconds": train["seconds"], "train-bytes": train["bytes"],
                           "accuracy": train["accuracy"], "details": train.get("details", {})}
    if sweep is not None:  # before any unlearning run: it deletes seed models
        row["sweep"] = sweep(stores)
    for count, clients in forgotten.items():
        output, copied = work / f"forget-{count}", work / f"stores-{count}"
        for source, target in ((work / "train", output), (stores, copied)):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        results = run_logged(link, suite, {**settings, "phase": "unlearn", "output-dir": str(output),
                                           "store-dir": str(copied), "forget-client": "+".join(map(str, clients))},
                             f"{label} unlearning {count} client(s)")
        request = results["requests"][-1]
        stages = [stage for stage in results["stages"] if stage["request"] == request["index"]]
        row[f"forget-{count}"] = {"seconds": request["total-seconds"], "bytes": sum(s["bytes"] for s in stages),
                                  "sample-gradients": sum(s["sample-gradients"] for s in stages),
                                  "accuracy": results["rounds"][-1]["accuracy"]}
    return row


def accuracy_sweep(settings: dict[str, Any], stores: Path, clients: int,
                   forgotten: dict[int, list[int]]) -> dict[str, Any]:
    """Mean test accuracy over the clients that remain, of the main models alone and of the
    ensembles for every topology, weight and set of forgotten clients, from the repositories."""
    run_config = {**settings, "store-dir": str(stores)}
    config = RunConfig.from_run_config(run_config)
    _, test = reference_and_evaluation(config)
    main, seed = {}, {}
    for partition in range(clients):
        client = ClientRun.from_configs(run_config, {"partition-id": partition, "num-partitions": clients})
        if not repository_file(client).is_file():  # a client without data trained nothing
            continue
        repository, cpu = load_repository(client), torch.device("cpu")
        for outputs, spec, state in ((main, repository.main_spec, repository.main),
                                     (seed, repository.seed_spec, repository.seed)):
            outputs[partition], _ = ensemble_probabilities(stored_model(spec, state, cpu), [], test.images, 1.0,
                                                           1000, cpu)

    def accuracy(probabilities: torch.Tensor) -> float:
        return float((probabilities.argmax(1) == test.labels).double().mean())

    sets = {"0": [], **{str(count): chosen for count, chosen in forgotten.items()}}
    sweep: dict[str, Any] = {"main": {key: _mean([accuracy(main[p]) for p in main if p not in gone])
                                      for key, gone in sets.items()}}
    for topology, degree in TOPOLOGIES.items():
        graph = neighbours(clients, topology, degree)
        sweep[topology] = {}
        for weight in LAMBDAS:
            sweep[topology][str(weight)] = {}
            for key, gone in sets.items():
                scores = []
                for p in (p for p in main if p not in gone):
                    held = [seed[j] for j in graph[p] if j in seed and j not in gone]
                    mixed = weight * main[p] + (1 - weight) * torch.stack(held).mean(0) if held else main[p]
                    scores.append(accuracy(mixed))
                sweep[topology][str(weight)][key] = _mean(scores)
    return sweep


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def markdown_lines(report: dict[str, Any], weight: float) -> list[str]:
    """The suite's tables: accuracy (at ``weight``), costs and the weight sweep."""
    seeds = next(iter(report["variants"].values()))["seeds"]

    def column(values: list[float], percent: bool = True, digits: int = 2) -> str:
        return cell(mean_std(values), percent, digits)

    lines = [f"Forgotten: the largest client, then the three largest at once (per seed: "
             f"{'; '.join(str(s['forgotten']) for s in seeds)}). Accuracy on the global test set "
             f"(the hold-out reference images left out), mean over the clients that remain; lambda = {weight}.", "",
             "| setup | topology | main model alone | ensemble | gain | after forgetting 1 client | "
             "after forgetting 3 clients |", "|" + " --- |" * 7]
    for setup in SETUPS:
        for topology in TOPOLOGIES:
            at = [s[setup]["sweep"][topology][str(weight)] for s in seeds]
            mains = [s[setup]["sweep"]["main"]["0"] for s in seeds]
            lines.append(f"| HDUS, {setup} | {topology} | {column(mains)} | {column([a['0'] for a in at])} | "
                         f"{column([a['0'] - m for a, m in zip(at, mains)])} | {column([a['1'] for a in at])} | "
                         f"{column([a['3'] for a in at])} |")
    lines.append(f"| FedAvg (QuickDrop's global model), QuickDrop unlearning | — | — | "
                 f"{column([s['quickdrop']['accuracy'] for s in seeds])} | — | "
                 f"{column([s['quickdrop']['forget-1']['accuracy'] for s in seeds])} | "
                 f"{column([s['quickdrop']['forget-3']['accuracy'] for s in seeds])} |")
    lines += ["", "Cost (HDUS measured over the full topology, every seed model to every client):", "",
              "| method | training (s) | MB exchanged in training | unlearning 1 client (s) | MB | "
              "unlearning 3 clients (s) | MB | sample gradients in unlearning |", "|" + " --- |" * 8]
    for name, key in (("HDUS, homogeneous", "homogeneous"), ("HDUS, heterogeneous", "heterogeneous"),
                      ("QuickDrop", "quickdrop")):
        rows = [s[key] for s in seeds]
        lines.append(f"| {name} | {column([r['train-seconds'] for r in rows], False, 1)} | "
                     f"{column([r['train-bytes'] / 1e6 for r in rows], False)} | "
                     f"{column([r['forget-1']['seconds'] for r in rows], False)} | "
                     f"{column([r['forget-1']['bytes'] / 1e6 for r in rows], False)} | "
                     f"{column([r['forget-3']['seconds'] for r in rows], False)} | "
                     f"{column([r['forget-3']['bytes'] / 1e6 for r in rows], False)} | "
                     f"{column([r['forget-3']['sample-gradients'] for r in rows], False, 0)} |")
    lines += ["", "Ensemble accuracy by lambda (the main model's weight; 1 = the main model alone), nothing "
              "forgotten:", "", "| setup | topology | " + " | ".join(f"lambda {w}" for w in LAMBDAS) + " |",
              "|" + " --- |" * (2 + len(LAMBDAS))]
    for setup in SETUPS:
        for topology in TOPOLOGIES:
            lines.append(f"| {setup} | {topology} | " + " | ".join(
                column([s[setup]["sweep"][topology][str(w)]["0"] for s in seeds]) for w in LAMBDAS) + " |")
    return lines


def draw(plt, report: dict[str, Any], weight: float):
    """Accuracy bars (main alone, ensemble, after forgetting) and the lambda sweep."""
    seeds = next(iter(report["variants"].values()))["seeds"]
    figure, (bars, sweep) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [f"{setup[:6]}., {topology}" for setup in SETUPS for topology in TOPOLOGIES]
    groups = {"main model alone": [], "ensemble": [], "after forgetting 3": []}
    for setup in SETUPS:
        for topology in TOPOLOGIES:
            at = [s[setup]["sweep"][topology][str(weight)] for s in seeds]
            groups["main model alone"].append(100 * _mean([s[setup]["sweep"]["main"]["0"] for s in seeds]))
            groups["ensemble"].append(100 * _mean([a["0"] for a in at]))
            groups["after forgetting 3"].append(100 * _mean([a["3"] for a in at]))
    width = 0.8 / len(groups)
    for index, (label, values) in enumerate(groups.items()):
        bars.bar([p + (index - 1) * width for p in range(len(names))], values, width=width, label=label)
    bars.axhline(100 * _mean([s["quickdrop"]["accuracy"] for s in seeds]), color="k", linestyle="--",
                 label="FedAvg global model")
    bars.set_xticks(list(range(len(names))), names, rotation=20, fontsize="small")
    bars.set_ylabel("test accuracy (%)")
    bars.set_ylim(0, 120)  # room for the legend above the bars
    bars.legend(fontsize="small", ncol=2, loc="upper center")
    for setup in SETUPS:
        for topology in TOPOLOGIES:
            sweep.plot(LAMBDAS, [100 * _mean([s[setup]["sweep"][topology][str(w)]["0"] for s in seeds])
                                 for w in LAMBDAS], marker="o", label=f"{setup}, {topology}")
    sweep.set_xlabel("lambda (weight of the main model)")
    sweep.set_ylabel("ensemble test accuracy (%)")
    sweep.legend(fontsize="small")
    return figure
