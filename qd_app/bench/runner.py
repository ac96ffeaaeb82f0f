"""Running the app for a suite: train once per seed, then every method from a copy of that training."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..core.data import evaluation_split, load_split, partition_indices
from ..core.metrics import membership_inference, output_kl, tug_of_war
from ..core.models import ModelSpec, build_model
from ..core.training import logits
from ..server.results import CHECKPOINT_FILE
from .suites import EXPERIMENT, MIA_MEMBERS, Suite, config_text
from .superlink import Link


def _load_results(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / EXPERIMENT / "results.json").read_text())


def _run(link: Link, suite: Suite, settings: dict[str, Any], label: str) -> dict[str, Any]:
    started = time.perf_counter()
    print(f"  [{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    run, log = link.run_app(config_text(settings), suite.clients)
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
        "round-seconds": {s["name"]: s["seconds"] / s["rounds"] for s in unlearn_stages
                          if s.get("rounds") and "seconds" in s},
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
        forget_index = partition_indices(config, suite.clients)[client]
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


def run_seed(link: Link, suite: Suite, variant: dict[str, Any], seed: int, work: Path,
             methods: tuple[str, ...]) -> dict[str, Any]:
    """Train once, then every method from a copy of the trained experiment."""
    base = {**suite.settings, **variant, "seed": seed, "experiment": EXPERIMENT, "store-dir": str(work / "stores")}
    trained = work / "train"
    training = _run(link, suite, {**base, "phase": "train", "output-dir": str(trained)}, f"seed {seed}: training")
    rows, model_files = {}, {}
    for method in methods:
        output = work / method
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(trained, output)
        settings = {**base, **suite.request, "phase": "unlearn", "method": method, "output-dir": str(output)}
        results = _run(link, suite, settings, f"seed {seed}: {method}")
        if suite.relearn:
            results = _run(link, suite, {**settings, "phase": "relearn", "forget-class": "", "forget-client": ""},
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
            "train-round-seconds": train["seconds"] / train["rounds"],
            "train-compute-seconds": train.get("compute-seconds", 0.0),
            "train-distill-seconds": train.get("distill-seconds", 0.0), "methods": rows,
            "federaser-bytes": training.get("stores", {}).get("federaser-bytes", 0),
            "store-bytes": training.get("stores", {}).get("bytes", [])}
