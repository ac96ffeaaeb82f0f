"""The suite's figure: time and accuracy bars, or every class's accuracy over the rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..server.evaluation import RoundRecord
from .decentralized import draw
from ..server.results import draw_class_accuracy
from .report import method_title, variant_summary
from .suites import Suite


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
        axis.set_title(f"{method_title(method)}, seed {seed['seed']}: test accuracy of every class", pad=14)
    return figure


def _bars_figure(plt, suite: Suite, report: dict[str, Any]):
    """Time (log scale) and accuracy bars: per method, or per variant for a sweep."""
    if suite.by_variant:
        rows = [("", list(report["variants"]),
                 [variant_summary(suite, result) for result in report["variants"].values()])]
    else:
        rows = [(variant, [method_title(m) for m in result["summary"]], list(result["summary"].values()))
                for variant, result in report["variants"].items()]
    figure, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for (variant, names, entries), (time_axis, accuracy_axis) in zip(rows, axes):
        percent = lambda key: [(100 * e[key][0], 100 * e[key][1]) for e in entries]  # noqa: E731
        if suite.methods:
            times = {"unlearn + recover": [e["seconds"] for e in entries]}
            if suite.by_variant and "retrain" in suite.methods:
                times = {"QuickDrop": times["unlearn + recover"], "Retrain-Or": [e["retrain-seconds"] for e in entries]}
            accuracy = {"F-Set": percent("forget"), "R-Set": percent("retain")}
            if suite.relearn:
                times["relearn"] = [e["relearn-seconds"] for e in entries]
                accuracy = {"F-Set after recovery": percent("forget"), "R-Set after recovery": percent("retain"),
                            "F-Set after relearning": percent("relearn-forget"),
                            "R-Set after relearning": percent("relearn-retain")}
            _grouped_bars(time_axis, names, times, "seconds" if suite.relearn else "unlearn + recover (s)", log=True)
            if suite.by_variant and "retrain" in suite.methods:  # the speed-up and the bound its work sets
                _grouped_bars(accuracy_axis, names, {"QuickDrop faster by": [e["speedup"] for e in entries],
                                                     "sample-gradient ratio": [e["gradient-ratio"] for e in entries]},
                              "times Retrain-Or's")
            else:
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

    if suite.decentralized:
        figure = draw(plt, report, RunConfig.from_run_config(report["settings"]).hdus_lambda)
    else:
        figure = _sequence_figure(plt, report) if suite.sequence else _bars_figure(plt, suite, report)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
