"""Benchmark: every unlearning method from the same trained model, side by side.

    python -m qd_app.bench <suite> [--quick] [--seeds N] [--set KEY=VALUE ...] [--out DIR]

Each suite drives the real app with ``flwr run`` against a private simulation
SuperLink (:mod:`qd_app.local_federation`). Per seed it trains once (QuickDrop
training, which also leaves the clients' stores and FedEraser's history), then runs
every method with ``phase=unlearn`` on a copy of that trained experiment, so all
start from the same model, partitions and machine, in one invocation. It reads each
run's results.json, measures the final models (membership inference, tug-of-war and
output KL against Retrain-Or) and writes ``<out>/<suite>.json``, ``<suite>.md`` and
``<suite>.png``. Retrain-Or runs with the training stage's own settings.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .data import evaluation_split, load_split, partition_indices
from .errors import UserFacingError
from .evaluation import RoundRecord
from .local_federation import PROJECT, SimulationSuperLink
from .metrics import membership_inference, output_kl, tug_of_war
from .models import ModelSpec, build_model
from .results import CHECKPOINT_FILE, draw_class_accuracy
from .training import logits

NUM_CLIENTS = 10
EXPERIMENT = "bench"
MIA_MEMBERS = 5000


@dataclass(frozen=True)
class Suite:
    """One comparison: the settings every run shares, the methods, and the request."""

    name: str
    title: str
    settings: dict[str, Any]
    methods: tuple[str, ...]
    request: dict[str, str]
    relearn: bool = False
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    by_variant: bool = False  # one table row per variant (a sweep) instead of per method
    sequence: bool = False  # a sequence of requests: plot every class's accuracy over the rounds


SCALES = (1, 10, 50, 100, 200, 1000)
# The paper's Table 2 schedule (unlearning 1 round, recovery 2 rounds of 1 epoch), for every
# method alike; recover-lr 0.03 because 0.01 left one seed's R-Set 5.6 points low.
COMMON = {"dataset": "mnist", "alpha": 0.1, "federaser-interval": 2, "unlearn-rounds": 1, "recover-epochs": 1,
          "recover-lr": 0.03}
SUITES = {
    suite.name: suite
    for suite in (
        Suite("class-level", "Class-level unlearning of class 9 (cf. QuickDrop Table 2)", COMMON,
              ("retrain", "sga", "federaser", "fu-mp", "quickdrop"), {"forget-class": "9"}),
        Suite("client-level", "Client-level unlearning of client 4 (cf. Table 4)", COMMON,
              ("retrain", "sga", "federaser", "s2u", "quickdrop"), {"forget-class": "", "forget-client": "4"},
              variants={"non-IID": {}, "IID": {"partitioning": "iid"}}),
        Suite("relearn", "Unlearning class 9, recovery, then relearning (cf. Table 5)", COMMON,
              ("retrain", "sga", "federaser", "quickdrop"), {"forget-class": "9"}, relearn=True),
        Suite("sequential", "Every class unlearned one after another (cf. Figure 4)",
              {**COMMON, "unlearn-rounds": 3},
              ("quickdrop",), {"forget-class": "all"}, sequence=True),
        # 3 training rounds (95 % test accuracy on this preset) keep six trainings CPU-affordable
        Suite("scale", "QuickDrop's scale s: accuracy and cost of unlearning class 9 (cf. Figure 6)",
              {**COMMON, "num-server-rounds": 3}, ("quickdrop",), {"forget-class": "9"},
              variants={f"s={scale}": {"scale": scale} for scale in SCALES}, by_variant=True),
        Suite("overhead", "Distillation overhead of QuickDrop training (cf. Table 6)", COMMON, (), {},
              variants={"MNIST": {}}, by_variant=True),
    )
}


def _config_text(settings: dict[str, Any]) -> str:
    """Run-config overrides in ``flwr run -c`` form."""
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else repr(v)}" for k, v in settings.items())


def _load_results(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / EXPERIMENT / "results.json").read_text())


def _run(link: SimulationSuperLink, settings: dict[str, Any], label: str) -> dict[str, Any]:
    started = time.perf_counter()
    print(f"  [{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    run, log = link.run_app(_config_text(settings), NUM_CLIENTS)
    if run["status"] != "finished:completed":
        raise RuntimeError(f"{label} failed ({run['status']}):\n{log[-3000:]}")
    print(f"  [{time.strftime('%H:%M:%S')}] {label} done in {time.perf_counter() - started:.0f} s", flush=True)
    return _load_results(Path(settings["output-dir"]))


def method_row(results: dict[str, Any], relearn: bool) -> dict[str, Any]:
    """One method's numbers from its results.json: every request it served, in the runs
    after training (the relearning request comes in a run of its own)."""
    requests = results["requests"]
    unlearn = next(r for r in requests if r["action"] == "unlearn")
    unlearn_stages = [s for s in results["stages"] if s["request"] == unlearn["index"]]
    row = {
        "seconds": unlearn["total-seconds"],
        "stage-seconds": unlearn["seconds"],
        "samples": unlearn["samples"],
        "sample-gradients": sum(s["sample-gradients"] for s in unlearn_stages),
        "bytes": sum(s.get("bytes", 0) for s in unlearn_stages),
        "compute-seconds": sum(s.get("compute-seconds", 0.0) for s in unlearn_stages),
        "before": unlearn["before"],
        "after": {key[len("after-"):]: value for key, value in unlearn.items() if key.startswith("after-")},
    }
    final = list(row["after"].values())[-1]
    row["forget"], row["retain"] = final["forget-accuracy"], final["retain-accuracy"]
    row["requests"] = [_request_row(r) for r in requests if r["action"] == "unlearn"]
    if relearn:
        relearned = next(r for r in requests if r["action"] == "relearn")
        row["relearn"] = relearned["after-relearn"]
        row["relearn-seconds"] = relearned["total-seconds"]
    return row


def _request_row(request: dict[str, Any]) -> dict[str, Any]:
    """F-Set / R-Set before and after each stage, and seconds, of one request (sequential suites)."""
    return {"label": request["label"], "seconds": request["total-seconds"], "before": request["before"],
            **{key: value for key, value in request.items() if key.startswith("after-")}}


def _load_model(config: RunConfig, model_file: Path) -> torch.nn.Module:
    model = build_model(ModelSpec.from_config(config))
    model.load_state_dict(torch.load(model_file, weights_only=True)["state-dict"])
    return model


def _model_metrics(config: RunConfig, suite: Suite, model_files: dict[str, Path]) -> dict[str, dict[str, float]]:
    """MIA on the forget set, and KL / tug-of-war against Retrain-Or, for every method's final model."""
    train = load_split(config.dataset, config.data_path, True)
    test = evaluation_split(config)
    if "forget-client" in suite.request and suite.request["forget-client"]:
        client = int(suite.request["forget-client"])
        forget_index = partition_indices(config, NUM_CLIENTS)[client]
        retain_mask = torch.ones(len(train), dtype=torch.bool)
        retain_mask[torch.as_tensor(forget_index)] = False
        test_forget = torch.zeros(len(test), dtype=torch.bool)
    else:
        classes = torch.tensor([int(c) for c in suite.request["forget-class"].split("+")])
        retain_mask = ~torch.isin(train.labels, classes)
        forget_index = torch.nonzero(~retain_mask).flatten().numpy()
        test_forget = torch.isin(test.labels, classes)
    generator = torch.Generator().manual_seed(config.seed)
    members = torch.nonzero(retain_mask).flatten()
    members = members[torch.randperm(len(members), generator=generator)[:MIA_MEMBERS]]
    forget = train.subset(forget_index)
    all_outputs = {}
    for method, path in model_files.items():
        model = _load_model(config, path)
        all_outputs[method] = {name: logits(model, images, config.eval_batch_size) for name, images in
                               (("members", train.images[members]), ("test", test.images), ("forget", forget.images))}
    metrics = {}
    for method, outputs in all_outputs.items():
        predictions = outputs["test"].argmax(1)
        accuracy = {
            "forget": float((outputs["forget"].argmax(1) == forget.labels).double().mean()),
            "retain": float((predictions == test.labels)[~test_forget].double().mean()),
            "test": float((predictions == test.labels).double().mean()),
        }
        metrics[method] = {
            "mia": membership_inference((outputs["members"], train.labels[members]),
                                        (outputs["test"], test.labels), (outputs["forget"], forget.labels),
                                        seed=config.seed),
            "accuracy": accuracy,
        }
    if "retrain" in metrics:
        for method, outputs in all_outputs.items():
            metrics[method]["kl-vs-retrain"] = output_kl(outputs["test"], all_outputs["retrain"]["test"])
            metrics[method]["tug-of-war"] = tug_of_war(metrics[method]["accuracy"], metrics["retrain"]["accuracy"])
    return metrics


def run_seed(link: SimulationSuperLink, suite: Suite, variant: dict[str, Any], seed: int, work: Path,
             methods: tuple[str, ...]) -> dict[str, Any]:
    """Train once, then every method from a copy of the trained experiment."""
    base = {**suite.settings, **variant, "seed": seed, "experiment": EXPERIMENT, "store-dir": str(work / "stores")}
    trained = work / "train"
    training = _run(link, {**base, "phase": "train", "output-dir": str(trained)}, f"seed {seed}: training")
    rows, model_files = {}, {}
    for method in methods:
        output = work / method
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(trained, output)
        settings = {**base, **suite.request, "phase": "unlearn", "method": method, "output-dir": str(output)}
        results = _run(link, settings, f"seed {seed}: {method}")
        if suite.relearn:
            results = _run(link, {**settings, "phase": "relearn", "forget-class": "", "forget-client": ""},
                           f"seed {seed}: {method} relearning")
        rows[method] = method_row(results, suite.relearn)
        if suite.sequence:
            rows[method]["rounds"] = results["rounds"]
        model_files[method] = output / EXPERIMENT / CHECKPOINT_FILE
    config = RunConfig.from_run_config(base)
    if not suite.relearn and "retrain" in methods:
        for method, extra in _model_metrics(config, suite, model_files).items():
            rows[method].update(extra)
    train = training["stages"][0]
    return {"seed": seed, "train-seconds": train["seconds"], "train-accuracy": train["accuracy"],
            "train-compute-seconds": train.get("compute-seconds", 0.0),
            "train-distill-seconds": train.get("distill-seconds", 0.0), "methods": rows,
            "federaser-bytes": training.get("stores", {}).get("federaser-bytes", 0),
            "store-bytes": training.get("stores", {}).get("bytes", [])}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _speedup(rows: list[dict[str, Any]], seeds: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """How many times QuickDrop's ``key`` seconds fit in each row's, per seed (mean, spread)."""
    return _mean_std([row[key] / seed["methods"]["quickdrop"][key] for row, seed in zip(rows, seeds)])


def summarise(seeds: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Mean and spread over seeds of every reported number, per method."""
    summary = {}
    for method in methods:
        rows = [seed["methods"][method] for seed in seeds]
        entry = {
            "seconds": _mean_std([r["seconds"] for r in rows]),
            "forget": _mean_std([r["forget"] for r in rows]),
            "retain": _mean_std([r["retain"] for r in rows]),
            "forget-after-unlearn": _mean_std([r["after"].get("unlearn", {}).get("forget-accuracy")
                                               if "unlearn" in r["after"] else None for r in rows]),
            "sample-gradients": _mean_std([r["sample-gradients"] for r in rows]),
            "bytes": _mean_std([r["bytes"] for r in rows]),
            "compute-seconds": _mean_std([r.get("compute-seconds") for r in rows]),
        }
        if "quickdrop" in methods:
            entry["quickdrop-speedup"] = _speedup(rows, seeds, "seconds")
        for key in ("mia", "kl-vs-retrain", "tug-of-war"):
            if all(key in r for r in rows):
                entry[key] = _mean_std([r[key] for r in rows])
        if all("relearn" in r for r in rows):
            entry["relearn-forget"] = _mean_std([r["relearn"]["forget-accuracy"] for r in rows])
            entry["relearn-retain"] = _mean_std([r["relearn"]["retain-accuracy"] for r in rows])
            entry["relearn-seconds"] = _mean_std([r["relearn-seconds"] for r in rows])
            if "quickdrop" in methods:
                entry["relearn-quickdrop-speedup"] = _speedup(rows, seeds, "relearn-seconds")
        summary[method] = entry
    return summary


METHOD_NAMES = {"retrain": "Retrain-Or", "sga": "SGA-Or", "federaser": "FedEraser", "fu-mp": "FU-MP",
                "s2u": "S2U", "quickdrop": "QuickDrop"}


def _cell(value: tuple[float, float], percent: bool = False, digits: int = 2) -> str:
    mean, spread = value
    if math.isnan(mean):
        return "—"
    scale = 100 if percent else 1
    return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}" + (" %" if percent else "")


def markdown(suite: Suite, report: dict[str, Any]) -> str:
    """The suite's tables in Markdown."""
    lines = [f"## {suite.title}", "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Seeds: {report['seeds']}; settings: `{_config_text(report['settings'])}`", ""]
    if suite.by_variant:
        return "\n".join(lines + _variant_lines(suite, report)) + "\n"
    for variant, result in report["variants"].items():
        if variant:
            lines += [f"### {variant}", ""]
        header = ("| method | F-Set after unlearning | F-Set | R-Set | seconds (unlearn + recover) | "
                  "QuickDrop faster by | sample gradients | MB sent |")
        model_metrics = any("mia" in entry for entry in result["summary"].values())
        if model_metrics:
            header += " MIA on forget set | ToW | KL vs Retrain-Or |"
        lines += [header, "|" + " --- |" * header.count("|", 1)]
        for method, entry in result["summary"].items():
            line = (f"| {METHOD_NAMES[method]} | {_cell(entry['forget-after-unlearn'], True)} | "
                    f"{_cell(entry['forget'], True)} | {_cell(entry['retain'], True)} | {_cell(entry['seconds'])} | "
                    f"{_cell(entry.get('quickdrop-speedup', (math.nan, 0)), digits=1)}x | "
                    f"{_cell(entry['sample-gradients'], digits=0)} | "
                    f"{_cell((entry['bytes'][0] / 1e6, entry['bytes'][1] / 1e6))} |")
            if model_metrics:
                line += (f" {_cell(entry.get('mia', (math.nan, 0)), True)} | "
                         f"{_cell(entry.get('tug-of-war', (math.nan, 0)), digits=3)} | "
                         f"{_cell(entry.get('kl-vs-retrain', (math.nan, 0)), digits=4)} |")
            lines.append(line)
        if suite.relearn:
            lines += _relearn_lines(result["summary"])
        lines += _request_lines(result["seeds"])
        train = _mean_std([s["train-seconds"] for s in result["seeds"]])
        lines += ["", f"Training (QuickDrop, with distillation): {_cell(train, digits=1)} s; "
                      f"FedEraser's stored updates: {_cell(_mean_std([s['federaser-bytes'] / 1e6 for s in result['seeds']]))} MB "
                      f"on the server; QuickDrop stores: "
                      f"{_cell(_mean_std([sum(s['store-bytes']) / 1e6 for s in result['seeds']]))} MB over all clients.", ""]
    return "\n".join(lines) + "\n"


def _variant_summary(suite: Suite, result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Training cost and (with a method) the request's outcome of one variant of a sweep."""
    seeds = result["seeds"]
    row = {
        "train-accuracy": _mean_std([s["train-accuracy"] for s in seeds]),
        "train-seconds": _mean_std([s["train-seconds"] for s in seeds]),
        "train-compute-seconds": _mean_std([s["train-compute-seconds"] for s in seeds]),
        "train-distill-seconds": _mean_std([s["train-distill-seconds"] for s in seeds]),
        "overhead": _mean_std([s["train-distill-seconds"] / s["train-compute-seconds"] for s in seeds
                               if s["train-compute-seconds"]]),
        "store-mb": _mean_std([sum(s["store-bytes"]) / 1e6 for s in seeds]),
    }
    if suite.methods:
        row.update({key: result["summary"][suite.methods[0]][key]
                    for key in ("forget-after-unlearn", "forget", "retain", "seconds", "compute-seconds")})
    return row


def _variant_lines(suite: Suite, report: dict[str, Any]) -> list[str]:
    """One row per variant: training cost and, with a method, the request's outcome."""
    header = ("| variant | training accuracy | training seconds | clients' training compute (s) | "
              "of which distillation (s) | distillation share | QuickDrop stores (MB) |")
    if suite.methods:
        header += (" F-Set after unlearning | F-Set | R-Set | seconds (unlearn + recover) | "
                   "clients' compute (s, unlearn + recover) |")
    lines = [header, "|" + " --- |" * header.count("|", 1)]
    for variant, result in report["variants"].items():
        row = _variant_summary(suite, result)
        line = (f"| {variant} | {_cell(row['train-accuracy'], True)} | {_cell(row['train-seconds'], digits=1)} | "
                f"{_cell(row['train-compute-seconds'], digits=1)} | {_cell(row['train-distill-seconds'], digits=1)} | "
                f"{_cell(row['overhead'], True, digits=1)} | {_cell(row['store-mb'])} |")
        if suite.methods:
            line += (f" {_cell(row['forget-after-unlearn'], True)} | {_cell(row['forget'], True)} | "
                     f"{_cell(row['retain'], True)} | {_cell(row['seconds'])} | {_cell(row['compute-seconds'])} |")
        lines.append(line)
    return lines


def _relearn_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The relearning request's table (the paper's Table 5), and why the model metrics are absent."""
    lines = ["", "Relearning the class (a later run, `phase=relearn`):", "",
             "| method | F-Set after relearning | R-Set after relearning | seconds (relearn) | QuickDrop faster by |",
             "|" + " --- |" * 5]
    for method, entry in summary.items():
        lines.append(f"| {METHOD_NAMES[method]} | {_cell(entry['relearn-forget'], True)} | "
                     f"{_cell(entry['relearn-retain'], True)} | {_cell(entry['relearn-seconds'])} | "
                     f"{_cell(entry.get('relearn-quickdrop-speedup', (math.nan, 0)), digits=1)}x |")
    return lines + ["", "MIA, ToW and KL are not measured in this suite: the final models have relearned the class."]


def _request_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """Per-request table (mean ± spread over seeds) for methods that served several requests."""
    lines = []
    for method in seeds[0]["methods"]:
        per_seed = [seed["methods"][method]["requests"] for seed in seeds]
        if len(per_seed[0]) < 2:
            continue
        lines += ["", f"{METHOD_NAMES[method]}, request by request:", "",
                  "| request | F-Set before | F-Set after unlearning | F-Set after recovery | R-Set before | "
                  "R-Set after recovery | seconds |", "|" + " --- |" * 7]
        for index, first in enumerate(per_seed[0]):
            rows = [requests[index] for requests in per_seed if index < len(requests)]

            def split(stage: str, key: str, rows=rows) -> str:
                return _cell(_mean_std([(r.get(stage) or {}).get(key) for r in rows]), True)

            lines.append(f"| {first['label']} | {split('before', 'forget-accuracy')} | "
                         f"{split('after-unlearn', 'forget-accuracy')} | {split('after-recover', 'forget-accuracy')} | "
                         f"{split('before', 'retain-accuracy')} | {split('after-recover', 'retain-accuracy')} | "
                         f"{_cell(_mean_std([r['seconds'] for r in rows]))} |")
    return lines


def _grouped_bars(axis, names: list[str], groups: dict[str, list[tuple[float, float]]], ylabel: str,
                  log: bool = False) -> None:
    """Bars (mean, spread) of every group side by side at each name."""
    width = 0.8 / len(groups)
    for index, (label, values) in enumerate(groups.items()):
        offset = (index - (len(groups) - 1) / 2) * width
        axis.bar([p + offset for p in range(len(names))], [v[0] for v in values], width=width,
                 yerr=[v[1] for v in values], label=label)
    axis.set_xticks(list(range(len(names))), names)
    axis.set_ylabel(ylabel)
    if log:
        axis.set_yscale("log")
    if len(groups) > 1:  # below the axis, clear of the bars
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small")


def _sequence_figure(plt, report: dict[str, Any]):
    """Every class's test accuracy over the rounds of the first seed, one panel per method (Figure 4)."""
    seed = next(iter(report["variants"].values()))["seeds"][0]
    figure, axes = plt.subplots(len(seed["methods"]), 1, figsize=(10, 4.5 * len(seed["methods"])), squeeze=False)
    for (method, row), (axis,) in zip(seed["methods"].items(), axes):
        rounds = [RoundRecord.from_dict(entry) for entry in row["rounds"]]
        draw_class_accuracy(axis, rounds, [str(c) for c in range(len(rounds[0].class_accuracy))])
        axis.set_title(f"{METHOD_NAMES[method]}, seed {seed['seed']}: test accuracy of every class", pad=14)
    return figure


def _bars_figure(plt, suite: Suite, report: dict[str, Any]):
    """Time (log scale) and accuracy bars: per method, or per variant for a sweep."""
    if suite.by_variant:
        rows = [("", list(report["variants"]),
                 [_variant_summary(suite, result) for result in report["variants"].values()])]
    else:
        rows = [(variant, [METHOD_NAMES[m] for m in result["summary"]], list(result["summary"].values()))
                for variant, result in report["variants"].items()]
    figure, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for (variant, names, entries), (time_axis, accuracy_axis) in zip(rows, axes):
        percent = lambda key: [(100 * e[key][0], 100 * e[key][1]) for e in entries]  # noqa: E731
        if suite.methods:
            times = {"unlearn + recover": [e["seconds"] for e in entries]}
            accuracy = {"F-Set": percent("forget"), "R-Set": percent("retain")}
            if suite.relearn:
                times["relearn"] = [e["relearn-seconds"] for e in entries]
                accuracy = {"F-Set after recovery": percent("forget"), "R-Set after recovery": percent("retain"),
                            "F-Set after relearning": percent("relearn-forget"),
                            "R-Set after relearning": percent("relearn-retain")}
            _grouped_bars(time_axis, names, times, "seconds" if suite.relearn else "unlearn + recover (s)", log=True)
            _grouped_bars(accuracy_axis, names, accuracy, "accuracy (%)")
        else:
            _grouped_bars(time_axis, names, {"clients' training compute": [e["train-compute-seconds"] for e in entries],
                                             "of which distillation": [e["train-distill-seconds"] for e in entries]},
                          "seconds")
            _grouped_bars(accuracy_axis, names, {"training accuracy": percent("train-accuracy")}, "accuracy (%)")
        time_axis.set_title(f"{variant} time".strip())
    return figure


def plot(suite: Suite, report: dict[str, Any], path: Path) -> None:
    """The suite's figure: class accuracy over the rounds for a sequence, bars otherwise."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    figure = _sequence_figure(plt, report) if suite.sequence else _bars_figure(plt, suite, report)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run a suite and write its JSON, Markdown table and plot."""
    parser = argparse.ArgumentParser(prog="python -m qd_app.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_setting,
                        help="override a run-config setting of the suite (TOML value), e.g. --set model-width=128")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results", help="where results go")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: <out>/../work)")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    if args.set:
        overrides = dict(args.set)
        try:  # a bad value stops here, before any run
            RunConfig.from_run_config({**suite.settings, **overrides})
        except UserFacingError as exc:
            parser.error(str(exc))
        suite = replace(suite, settings={**suite.settings, **overrides})
    seeds = list(range(1 if args.quick else args.seeds))
    work = (args.work or args.out.parent / "work").resolve() / suite.name
    started = time.perf_counter()
    report: dict[str, Any] = {
        "suite": suite.name, "command": "python -m qd_app.bench " + " ".join(argv or sys.argv[1:]),
        "machine": _machine(), "seeds": seeds, "settings": suite.settings, "variants": {},
    }
    with SimulationSuperLink(work / "flwrhome") as link:
        for variant, overrides in suite.variants.items():
            print(f"{suite.title} {variant}".strip(), flush=True)
            results = [run_seed(link, suite, overrides, seed, work / (variant or "default") / f"seed-{seed}",
                                suite.methods) for seed in seeds]
            report["variants"][variant] = {"seeds": results, "summary": summarise(results, suite.methods)}
    report["wall-seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    name = suite.name + ("-quick" if args.quick else "")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / f"{name}.md").write_text(markdown(suite, report))
    plot(suite, report, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.{{json,md,png}} after {report['wall-seconds'] / 60:.1f} min", flush=True)
    return 0


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a TOML value (a bare word is taken as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def _machine() -> str:
    import os  # pylint: disable=import-outside-toplevel
    import platform  # pylint: disable=import-outside-toplevel

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
