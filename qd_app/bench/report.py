"""The suite's numbers over seeds (mean and spread) and its Markdown tables."""

from __future__ import annotations

import math
from typing import Any

from ..config import RunConfig
from ..methods import resolve_method
from .decentralized import markdown_lines
from .numbers import cell, mean_std
from .suites import Suite, config_text


# reported where measured: key, column title, shown as a percentage, digits
OPTIONAL_COLUMNS = (("fit-gap", "F-Set − test on its classes", True, 2),
                    ("mia-gap", "MIA − test on its classes", True, 2), ("anamnesis", "AIN", False, 2))


def _speedup(rows: list[dict[str, Any]], seeds: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """How many times QuickDrop's ``key`` seconds fit in each row's, per seed (mean, spread)."""
    return mean_std([row[key] / seed["methods"]["quickdrop"][key] for row, seed in zip(rows, seeds)])


def summarise(seeds: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Mean and spread over seeds of every reported number, per method."""
    summary = {}
    for method in methods:
        rows = [seed["methods"][method] for seed in seeds]
        entry = {
            "seconds": mean_std([r["seconds"] for r in rows]),
            "forget": mean_std([r["forget"] for r in rows]),
            "retain": mean_std([r["retain"] for r in rows]),
            "forget-after-unlearn": mean_std([r["after"].get("unlearn", {}).get("forget-accuracy")
                                               if "unlearn" in r["after"] else None for r in rows]),
            "sample-gradients": mean_std([r["sample-gradients"] for r in rows]),
            "bytes": mean_std([r["bytes"] for r in rows]),
            "compute-seconds": mean_std([r.get("compute-seconds") for r in rows]),
        }
        if "quickdrop" in methods:
            entry["quickdrop-speedup"] = _speedup(rows, seeds, "seconds")
        for key in ("mia", "kl-vs-retrain", "tug-of-war", *(key for key, *_ in OPTIONAL_COLUMNS)):
            if all(key in r for r in rows):
                entry[key] = mean_std([r[key] for r in rows])
        if all("relearn" in r for r in rows):
            entry["relearn-forget"] = mean_std([r["relearn"]["forget-accuracy"] for r in rows])
            entry["relearn-retain"] = mean_std([r["relearn"]["retain-accuracy"] for r in rows])
            entry["relearn-seconds"] = mean_std([r["relearn-seconds"] for r in rows])
            if "quickdrop" in methods:
                entry["relearn-quickdrop-speedup"] = _speedup(rows, seeds, "relearn-seconds")
        summary[method] = entry
    return summary


def method_title(method: str) -> str:
    """A method's name in tables and figures (e.g. ``SGA-Or``), from the method registry."""
    return resolve_method(method).title


def markdown(suite: Suite, report: dict[str, Any]) -> str:
    """The suite's tables in Markdown."""
    lines = [f"## {suite.title}", "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Seeds: {report['seeds']}; settings: `{config_text(report['settings'])}`", ""]
    if suite.by_variant:
        return "\n".join(lines + _variant_lines(suite, report)) + "\n"
    if suite.decentralized:
        return "\n".join(lines + markdown_lines(report, RunConfig.from_run_config(report["settings"]).hdus_lambda)) + "\n"
    for variant, result in report["variants"].items():
        if variant:
            lines += [f"### {variant}", ""]
        lines += _target_lines(variant, [seed.get("target") for seed in result["seeds"]], report["seeds"])
        header = ("| method | F-Set after unlearning | F-Set | R-Set | seconds (unlearn + recover) | "
                  "QuickDrop faster by | sample gradients | MB sent |")
        model_metrics = any("mia" in entry for entry in result["summary"].values())
        optional = [column for column in OPTIONAL_COLUMNS if any(column[0] in e for e in result["summary"].values())]
        if model_metrics:
            header += " MIA on forget set | ToW | KL vs Retrain-Or |" + "".join(f" {title} |" for _, title, *_ in optional)
        lines += [header, "|" + " --- |" * header.count("|", 1)]
        for method, entry in result["summary"].items():
            line = (f"| {method_title(method)} | {cell(entry['forget-after-unlearn'], True)} | "
                    f"{cell(entry['forget'], True)} | {cell(entry['retain'], True)} | {cell(entry['seconds'])} | "
                    f"{cell(entry.get('quickdrop-speedup', (math.nan, 0)), digits=1)}x | "
                    f"{cell(entry['sample-gradients'], digits=0)} | "
                    f"{cell((entry['bytes'][0] / 1e6, entry['bytes'][1] / 1e6))} |")
            if model_metrics:
                line += (f" {cell(entry.get('mia', (math.nan, 0)), True)} | "
                         f"{cell(entry.get('tug-of-war', (math.nan, 0)), digits=3)} | "
                         f"{cell(entry.get('kl-vs-retrain', (math.nan, 0)), digits=4)} |")
                line += "".join(f" {cell(entry.get(key, (math.nan, 0)), percent, digits)} |"
                                for key, _, percent, digits in optional)
            lines.append(line)
        if suite.relearn:
            lines += _relearn_lines(result["summary"])
        if suite.deployment is not None:
            lines += _round_lines(result["seeds"])
        lines += _request_lines(result["seeds"])
        lines += _client_lines(result["seeds"])
        train = mean_std([s["train-seconds"] for s in result["seeds"]])
        lines += ["", f"Training (QuickDrop, with distillation): {cell(train, digits=1)} s; "
                      f"FedEraser's stored updates: {cell(mean_std([s['federaser-bytes'] / 1e6 for s in result['seeds']]))} MB "
                      f"on the server; QuickDrop stores: "
                      f"{cell(mean_std([sum(s['store-bytes']) / 1e6 for s in result['seeds']]))} MB over all clients.", ""]
    return "\n".join(lines) + "\n"


def _target_lines(variant: str, targets: list[str | None], seeds: list[int]) -> list[str]:
    """What a target (e.g. ``largest client``) is in each seed, where its name does not say it."""
    if not any(targets) or len(targets) != len(seeds):  # no targets, or pooled over them
        return []
    if len(set(targets)) == 1:
        return [] if targets[0] in variant else [f"{targets[0]} in every seed", ""]
    return ["; ".join(f"seed {seed}: {target}" for seed, target in zip(seeds, targets)), ""]


def variant_summary(suite: Suite, result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Training cost and (with a method) the request's outcome of one variant of a sweep."""
    seeds = result["seeds"]
    row = {
        "train-accuracy": mean_std([s["train-accuracy"] for s in seeds]),
        "train-seconds": mean_std([s["train-seconds"] for s in seeds]),
        "train-compute-seconds": mean_std([s["train-compute-seconds"] for s in seeds]),
        "train-distill-seconds": mean_std([s["train-distill-seconds"] for s in seeds]),
        "overhead": mean_std([s["train-distill-seconds"] / s["train-compute-seconds"] for s in seeds
                               if s["train-compute-seconds"]]),
        "store-mb": mean_std([sum(s["store-bytes"]) / 1e6 for s in seeds]),
    }
    if suite.methods:
        row.update({key: result["summary"][suite.methods[0]][key]
                    for key in ("forget-after-unlearn", "forget", "retain", "seconds", "compute-seconds")})
    if suite.variant_clients:  # the cost of one training round and the memory, as the federation grows
        row.update({key: mean_std([s.get(key, math.nan) for s in seeds])
                    for key in ("train-round-seconds", "client-peak-mb", "server-peak-mb")})
    if "retrain" in suite.methods:  # the oracle's time, and the bound on the speed-up its work sets
        rows = [seed["methods"]["retrain"] for seed in seeds]
        row.update({"retrain-seconds": result["summary"]["retrain"]["seconds"],
                    "retrain-retain": result["summary"]["retrain"]["retain"],
                    "speedup": result["summary"]["retrain"]["quickdrop-speedup"],
                    "gradient-ratio": _speedup(rows, seeds, "sample-gradients")})
    return row


def _variant_lines(suite: Suite, report: dict[str, Any]) -> list[str]:
    """One row per variant: training cost and, with a method, the request's outcome."""
    header = ("| variant | training accuracy | training seconds | clients' training compute (s) | "
              "of which distillation (s) | distillation share | QuickDrop stores (MB) |")
    if suite.methods:
        header += (" F-Set after unlearning | F-Set | R-Set | seconds (unlearn + recover) | "
                   "clients' compute (s, unlearn + recover) |")
    if "retrain" in suite.methods:
        header += (" Retrain-Or R-Set | Retrain-Or seconds | QuickDrop faster by | "
                   "Retrain-Or's sample gradients per QuickDrop's |")
    if suite.variant_clients:
        header += " seconds per training round | a client process's peak (MB) | the server process's peak (MB) |"
    lines = [header, "|" + " --- |" * header.count("|", 1)]
    for variant, result in report["variants"].items():
        row = variant_summary(suite, result)
        line = (f"| {variant} | {cell(row['train-accuracy'], True)} | {cell(row['train-seconds'], digits=1)} | "
                f"{cell(row['train-compute-seconds'], digits=1)} | {cell(row['train-distill-seconds'], digits=1)} | "
                f"{cell(row['overhead'], True, digits=1)} | {cell(row['store-mb'])} |")
        if suite.methods:
            line += (f" {cell(row['forget-after-unlearn'], True)} | {cell(row['forget'], True)} | "
                     f"{cell(row['retain'], True)} | {cell(row['seconds'])} | {cell(row['compute-seconds'])} |")
        if "retrain" in suite.methods:
            line += (f" {cell(row['retrain-retain'], True)} | {cell(row['retrain-seconds'], digits=1)} | "
                     f"{cell(row['speedup'], digits=1)}x | "
                     f"{cell(row['gradient-ratio'], digits=1)} |")
        if suite.variant_clients:
            line += "".join(f" {cell(row[key], digits=1)} |"
                            for key in ("train-round-seconds", "client-peak-mb", "server-peak-mb"))
        lines.append(line)
    return lines


def _relearn_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The relearning request's table (the paper's Table 5), and why the model metrics are absent."""
    lines = ["", "Relearning the class (a later run, `phase=relearn`):", "",
             "| method | F-Set after relearning | R-Set after relearning | seconds (relearn) | QuickDrop faster by |",
             "|" + " --- |" * 5]
    for method, entry in summary.items():
        lines.append(f"| {method_title(method)} | {cell(entry['relearn-forget'], True)} | "
                     f"{cell(entry['relearn-retain'], True)} | {cell(entry['relearn-seconds'])} | "
                     f"{cell(entry.get('relearn-quickdrop-speedup', (math.nan, 0)), digits=1)}x |")
    return lines + ["", "MIA, ToW and KL are not measured in this suite: the final models have relearned the class."]


def _round_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """Seconds per round of every stage (a real federation: what one round of messages costs)."""
    stages = {"training": [seed["train-round-seconds"] for seed in seeds]}
    for method in seeds[0]["methods"]:
        for stage in seeds[0]["methods"][method].get("round-seconds", {}):
            stages[f"{method_title(method)} {stage}"] = [seed["methods"][method]["round-seconds"][stage]
                                                         for seed in seeds]
    return ["", "Seconds per round: " + "; ".join(f"{name} {cell(mean_std(values))}"
                                                 for name, values in stages.items()) + "."]


def _request_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """Per-request table (mean ± spread over seeds) for methods that served several requests."""
    lines = []
    for method in seeds[0]["methods"]:
        per_seed = [seed["methods"][method]["requests"] for seed in seeds]
        if len(per_seed[0]) < 2:
            continue
        lines += ["", f"{method_title(method)}, request by request:", "",
                  "| request | F-Set before | F-Set after unlearning | F-Set after recovery | R-Set before | "
                  "R-Set after recovery | seconds |", "|" + " --- |" * 7]
        for index, first in enumerate(per_seed[0]):
            rows = [requests[index] for requests in per_seed if index < len(requests)]

            def split(stage: str, key: str, rows=rows) -> str:
                return cell(mean_std([(r.get(stage) or {}).get(key) for r in rows]), True)

            lines.append(f"| {first['label']} | {split('before', 'forget-accuracy')} | "
                         f"{split('after-unlearn', 'forget-accuracy')} | {split('after-recover', 'forget-accuracy')} | "
                         f"{split('before', 'retain-accuracy')} | {split('after-recover', 'retain-accuracy')} | "
                         f"{cell(mean_std([r['seconds'] for r in rows]))} |")
    return lines


# Retrain-Or this far below the trained model on the test images of a client's classes: the
# client's data was irreplaceable (docs/benchmark.md, "Client-level unlearning")
IRREPLACEABLE = 0.015


def client_misses(quickdrop: dict[str, Any], retrain: dict[str, Any]) -> list[str]:
    """The lines of the client-level bar QuickDrop misses for one client and seed (empty: met):
    R-Set at most 1.5 points below Retrain-Or's, at least 50x faster, MIA within 5 points, and
    either F-Set within 3 points and ToW at least 0.95 or, where the client's data was
    irreplaceable, its data fitting like unseen data as closely as under Retrain-Or (fit-gap
    within 3 points). MIA is judged by how much more often the attack calls the client's data
    members than unseen images of its classes (``mia-gap``), where the report has it: the raw
    rate also counts the model's confidence on those classes (docs/benchmark.md)."""
    mia = "mia-gap" if "mia-gap" in quickdrop and "mia-gap" in retrain else "mia"
    checks = {"R-Set": quickdrop["retain"] >= retrain["retain"] - 0.015,
              "speed": retrain["seconds"] >= 50 * quickdrop["seconds"],
              "MIA": abs(quickdrop[mia] - retrain[mia]) <= 0.05}
    if retrain_loss(quickdrop, retrain) > IRREPLACEABLE:
        checks["fit-gap"] = abs(quickdrop["fit-gap"] - retrain["fit-gap"]) <= 0.03
    else:
        checks.update({"F-Set": abs(quickdrop["forget"] - retrain["forget"]) <= 0.03,
                       "ToW": quickdrop["tug-of-war"] >= 0.95})
    return [line for line, held in checks.items() if not held]


def retrain_loss(quickdrop: dict[str, Any], retrain: dict[str, Any]) -> float:
    """How much retraining without the client loses on the test images of its classes. The
    trained model's accuracy there is measured (``trained-unseen``) or, in reports without it,
    QuickDrop's when it took no step (its model is then the trained model)."""
    trained = quickdrop.get("trained-unseen")
    if trained is None:
        trained = quickdrop["accuracy"]["unseen"] if quickdrop["sample-gradients"] == 0 else math.nan
    return trained - retrain["accuracy"]["unseen"]


def _client_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """Per seed, QuickDrop against Retrain-Or on one client, and the bar's verdict."""
    if not all({"quickdrop", "retrain"} <= set(s["methods"]) and "fit-gap" in s["methods"]["quickdrop"]
               for s in seeds):
        return []
    gaps = all("mia-gap" in s["methods"][method] for s in seeds for method in ("quickdrop", "retrain"))
    lines = ["", "Per seed, QuickDrop / Retrain-Or (loss: Retrain-Or below the trained model on the test images "
             "of the client's classes; above 1.5 points the client's data was irreplaceable and F-Set is judged "
             "by the fit-gap" + ("; MIA is judged by the MIA gap" if gaps else "") + "):", "",
             "| seed | client | F-Set | R-Set | MIA |" + (" MIA gap |" if gaps else "") +
             " ToW | loss | fit-gap | faster by | bar |", "|" + " --- |" * (10 + gaps)]
    for seed in seeds:
        quickdrop, retrain = seed["methods"]["quickdrop"], seed["methods"]["retrain"]
        misses = client_misses(quickdrop, retrain)

        def pair(key: str) -> str:
            return f"{100 * quickdrop[key]:.2f} / {100 * retrain[key]:.2f}"

        lines.append(f"| {seed['seed']} | {seed['target']} | {pair('forget')} | {pair('retain')} | {pair('mia')} | "
                     + (f"{pair('mia-gap')} | " if gaps else "") +
                     f"{quickdrop['tug-of-war']:.3f} | {100 * retrain_loss(quickdrop, retrain):.2f} | "
                     f"{pair('fit-gap')} | {retrain['seconds'] / quickdrop['seconds']:.0f}x | "
                     f"{'missed: ' + ', '.join(misses) if misses else 'met'} |")
    return lines
