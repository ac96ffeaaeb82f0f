"""Running the app for a suite: train once per seed, then every method from a copy of that training."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config import DATASET_CLASSES, RunConfig
from ..core.data import LabeledImages, evaluation_split, load_split, partition_indices
from ..core.metrics import anamnesis_index, membership_attack, output_kl, relearn_steps, tug_of_war
from ..core.models import ModelSpec, build_model
from ..core.training import logits
from ..server.results import CHECKPOINT_FILE
from .suites import ANAMNESIS_SHARE, EXPERIMENT, MIA_MEMBERS, Suite, config_text
from .superlink import Link


def _load_results(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / EXPERIMENT / "results.json").read_text())


def run_logged(link: Link, suite: Suite, settings: dict[str, Any], label: str) -> dict[str, Any]:
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
    """A checkpoint's model, channels-last (the same outputs; convolutions faster on CPU)."""
    model = build_model(ModelSpec.from_config(config))
    model.load_state_dict(torch.load(model_file, weights_only=True)["state-dict"])
    return model.to(memory_format=torch.channels_last)


def target_requests(suite: Suite, config: RunConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """Every target of the suite as ``{name: (label, request)}``: the name is what the seeds share
    (``class 3``, ``largest client``), the label what it is in this seed's partition."""
    if not suite.targets:
        return {"": ("", suite.request)}
    if not suite.request.get("forget-client"):
        return {f"class {c}": (f"class {c}", {**suite.request, "forget-class": c}) for c in suite.targets}
    sizes = [len(part) for part in partition_indices(config, suite.clients)]
    by_size = sorted(range(len(sizes)), key=lambda client: (sizes[client], client))
    position = {"smallest": 0, "median": len(by_size) // 2, "largest": len(by_size) - 1}
    return {f"{role} client": (f"client {by_size[position[role]]} ({sizes[by_size[position[role]]]} samples)",
                               {**suite.request, "forget-client": str(by_size[position[role]])})
            for role in suite.targets}


def _anamnesis(config: RunConfig, trained_file: Path, models: dict[str, torch.nn.Module],
               forget: LabeledImages, test_forget: LabeledImages) -> dict[str, float]:
    """Anamnesis Index of every model: its relearning steps on the forget data until the forgotten
    test accuracy is back at 95 % of the trained model's, over Retrain-Or's steps."""

    def accuracy(model: torch.nn.Module) -> float:
        return float((logits(model, test_forget.images, config.eval_batch_size).argmax(1) == test_forget.labels)
                     .double().mean())

    goal = ANAMNESIS_SHARE * accuracy(_load_model(config, trained_file))
    steps = {method: relearn_steps(copy.deepcopy(model), forget.images, forget.labels, goal, accuracy, config.seed)
             for method, model in models.items()}
    return {method: anamnesis_index(count, steps["retrain"]) for method, count in steps.items()}


def _model_metrics(config: RunConfig, suite: Suite, request: dict[str, str], model_files: dict[str, Path],
                   trained_file: Path) -> dict[str, dict[str, float]]:
    """MIA on the forget set, and KL / tug-of-war against Retrain-Or, for every method's final model;
    for a client, also how much better its data fits than test images of its classes (``fit-gap``)
    and the trained model's accuracy on those test images (``trained-unseen``), and how much more
    often the attack calls its data members than those test images (``mia-gap``);
    with ``suite.anamnesis``, the Anamnesis Index of a class request."""
    train = load_split(config.dataset, config.data_path, True)
    test = evaluation_split(config)
    client_request = bool(request.get("forget-client"))
    if client_request:
        forget_index = partition_indices(config, suite.clients)[int(request["forget-client"])]
        retain_mask = torch.ones(len(train), dtype=torch.bool)
        retain_mask[torch.as_tensor(forget_index)] = False
        test_forget = torch.zeros(len(test), dtype=torch.bool)
    else:
        classes = torch.tensor([int(c) for c in request["forget-class"].split("+")])
        retain_mask = ~torch.isin(train.labels, classes)
        forget_index = torch.nonzero(~retain_mask).flatten().numpy()
        test_forget = torch.isin(test.labels, classes)
    generator = torch.Generator().manual_seed(config.seed)
    members = torch.nonzero(retain_mask).flatten()
    members = members[torch.randperm(len(members), generator=generator)[:MIA_MEMBERS]]
    forget = train.subset(forget_index)
    num_classes = DATASET_CLASSES[config.dataset]
    class_mix = torch.tensor(forget.class_counts(num_classes), dtype=torch.double) / len(forget)

    def unseen(hits: torch.Tensor) -> float:
        """The mean of ``hits`` (one per test image) in each class, weighted as the client's data
        holds them: what the client's data would score if it were unseen."""
        per_class = [float(hits[test.labels == c].double().mean()) for c in range(num_classes)]
        return float((class_mix * torch.tensor(per_class, dtype=torch.double)).sum())

    all_outputs, models = {}, {}
    for method, path in model_files.items():
        model = models[method] = _load_model(config, path)
        all_outputs[method] = {name: logits(model, images, config.eval_batch_size) for name, images in
                               (("members", train.images[members]), ("test", test.images), ("forget", forget.images))}
    if client_request:  # the trained model on the test images of the client's classes
        trained_unseen = unseen(logits(_load_model(config, trained_file), test.images,
                                       config.eval_batch_size).argmax(1) == test.labels)
    metrics = {}
    for method, outputs in all_outputs.items():
        correct = outputs["test"].argmax(1) == test.labels
        accuracy = {
            "forget": float((outputs["forget"].argmax(1) == forget.labels).double().mean()),
            "retain": float(correct[~test_forget].double().mean()),
            "test": float(correct.double().mean()),
        }
        attack = membership_attack((outputs["members"], train.labels[members]), (outputs["test"], test.labels),
                                   seed=config.seed)
        metrics[method] = {"mia": float(attack(outputs["forget"], forget.labels).double().mean()),
                           "accuracy": accuracy}
        if client_request:
            accuracy["unseen"] = unseen(correct)
            metrics[method]["fit-gap"] = accuracy["forget"] - accuracy["unseen"]
            metrics[method]["mia-gap"] = metrics[method]["mia"] - unseen(attack(outputs["test"], test.labels))
            metrics[method]["trained-unseen"] = trained_unseen
    if suite.anamnesis and not client_request:
        indices = _anamnesis(config, trained_file, models, forget, test.subset(torch.nonzero(test_forget).flatten()))
        for method, index in indices.items():
            metrics[method]["anamnesis"] = index
    if "retrain" in metrics:
        for method, outputs in all_outputs.items():
            metrics[method]["kl-vs-retrain"] = output_kl(outputs["test"], all_outputs["retrain"]["test"])
            metrics[method]["tug-of-war"] = tug_of_war(metrics[method]["accuracy"], metrics["retrain"]["accuracy"])
    return metrics


def run_seed(link: Link, suite: Suite, variant: dict[str, Any], seed: int, work: Path,
             methods: tuple[str, ...], trainings: dict[str, tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Train once (or take the training of an earlier suite of this invocation with the same
    settings), then every method for every target from a copy of the trained experiment."""
    training_settings = {**suite.settings, **variant, "seed": seed, "experiment": EXPERIMENT}
    key = json.dumps({**training_settings, "num-supernodes": suite.clients}, sort_keys=True)
    if key not in trainings:
        trained = work / "train"
        settings = {**training_settings, "store-dir": str(work / "stores"), "phase": "train", "output-dir": str(trained)}
        trainings[key] = (work, run_logged(link, suite, settings, f"seed {seed}: training"))
    trained_work, training = trainings[key]
    base = {**training_settings, "store-dir": str(trained_work / "stores")}
    config = RunConfig.from_run_config(base)
    train = training["stages"][0]
    shared = {"seed": seed, "train-seconds": train["seconds"], "train-accuracy": train["accuracy"],
              "train-round-seconds": train["seconds"] / train["rounds"],
              "train-compute-seconds": train.get("compute-seconds", 0.0),
              "train-distill-seconds": train.get("distill-seconds", 0.0),
              "client-peak-mb": train.get("client-peak-mb", 0.0), "server-peak-mb": train.get("server-peak-mb", 0.0),
              "federaser-bytes": training.get("stores", {}).get("federaser-bytes", 0),
              "store-bytes": training.get("stores", {}).get("bytes", [])}
    results_by_target = {}
    for target, (label, request) in target_requests(suite, config).items():
        rows, model_files = {}, {}
        for method in methods:
            output = work / "-".join(filter(None, (target.replace(" ", "-"), method)))
            shutil.rmtree(output, ignore_errors=True)
            shutil.copytree(trained_work / "train", output)
            settings = {**base, **request, "phase": "unlearn", "method": method, "output-dir": str(output)}
            title = f"seed {seed}: {' '.join(filter(None, (label, method)))}"
            results = run_logged(link, suite, settings, title)
            if suite.relearn:
                results = run_logged(link, suite, {**settings, "phase": "relearn", "forget-class": "", "forget-client": ""},
                               f"{title} relearning")
            rows[method] = method_row(results, suite.relearn)
            if suite.sequence:
                rows[method]["rounds"] = results["rounds"]
            model_files[method] = output / EXPERIMENT / CHECKPOINT_FILE
        if not suite.relearn and "retrain" in methods:
            trained_file = trained_work / "train" / EXPERIMENT / CHECKPOINT_FILE
            for method, extra in _model_metrics(config, suite, request, model_files, trained_file).items():
                rows[method].update(extra)
        results_by_target[target] = {**shared, "target": label, "methods": rows}
    return results_by_target
