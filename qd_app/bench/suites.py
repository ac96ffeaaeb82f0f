"""The benchmark's suites: what every run of a comparison shares, its methods and its request."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

NUM_CLIENTS = 10
EXPERIMENT = "bench"
MIA_MEMBERS = 5000
ANAMNESIS_SHARE = 0.95  # relearning goal: this share of the trained model's forgotten-class accuracy


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
    clients: int = NUM_CLIENTS
    variant_clients: dict[str, int] = field(default_factory=dict)  # a variant's own number of clients
    # several requests from one training: classes for a class request, or clients named by their
    # partition's size ("largest", "median", "smallest") for a client request
    targets: tuple[str, ...] = ()
    anamnesis: bool = False  # also the Anamnesis Index (relearning steps against Retrain-Or's)
    # "simulation", or a real federation on this machine (`qd-app federation up`) with these
    # options per variant: `plain` runs Flower's own SuperNode and Grid, for comparison
    deployment: dict[str, dict[str, Any]] | None = None
    decentralized: bool = False  # HDUS against main models alone and FedAvg (qd_app.bench.decentralized)


SCALES = (1, 10, 50, 100, 200, 1000)
TRAINING_ROUNDS = (5, 10, 20, 30)
# federation sizes; at 100 clients a tenth of them trains each round (the paper's SVHN setting)
FEDERATION_SIZES = {"10 clients": (10, {}), "20 clients": (20, {}), "50 clients": (50, {}),
                    "100 clients, 10 % per round": (100, {"fraction-train": 0.1})}
# The app's defaults otherwise (the paper's schedule: unlearning 1 round, recovery 2 rounds of
# 1 epoch, for every method alike), so a user's `flwr run .` is what the suites measure.
COMMON = {"dataset": "mnist", "alpha": 0.1, "federaser-interval": 2}
DATA_FREE_ROUNDS = 3  # trainings of four variants per seed kept CPU-affordable
SUITES = {
    suite.name: suite
    for suite in (
        Suite("class-level", "Class-level unlearning of classes 0, 3 and 9 (cf. QuickDrop Table 2)", COMMON,
              ("retrain", "sga", "federaser", "fu-mp", "quickdrop"), {"forget-class": "9"},
              targets=("0", "3", "9"), anamnesis=True),
        Suite("client-level", "Client-level unlearning of the largest, a median and the smallest client "
              "(cf. Table 4)", COMMON,
              ("retrain", "sga", "federaser", "s2u", "quickdrop"), {"forget-class": "", "forget-client": "4"},
              variants={"non-IID": {}, "IID": {"partitioning": "iid"}}, targets=("largest", "median", "smallest")),
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
        # Retrain-Or's cost grows with the training's rounds, QuickDrop's does not
        Suite("training-length", "QuickDrop against Retrain-Or as training grows: unlearning class 9",
              COMMON, ("quickdrop", "retrain"), {"forget-class": "9"},
              variants={f"{rounds} rounds": {"num-server-rounds": rounds} for rounds in TRAINING_ROUNDS},
              by_variant=True),
        # 3 training rounds (as `scale`) keep four trainings CPU-affordable
        Suite("federation-size", "QuickDrop against Retrain-Or as the federation grows: unlearning class 9",
              {**COMMON, "num-server-rounds": 3}, ("quickdrop", "retrain"), {"forget-class": "9"},
              variants={name: settings for name, (_, settings) in FEDERATION_SIZES.items()},
              variant_clients={name: clients for name, (clients, _) in FEDERATION_SIZES.items()}, by_variant=True),
        Suite("data-free", "Data-free unlearning of class 9 by the server alone (cf. ISPF Table 1)",
              {**COMMON, "num-server-rounds": DATA_FREE_ROUNDS},
              ("retrain", "ispf", "ispf-is", "ispf-pf", "gkt", "blockf", "quickdrop"), {"forget-class": "9"},
              variants={f"{name}, {norm} norm": {"dataset": dataset, "model-norm": norm}
                        for name, dataset in (("MNIST", "mnist"), ("Fashion-MNIST", "fashion-mnist"))
                        for norm in ("batch", "instance")}, anamnesis=True),
        Suite("deployment", "Class-level unlearning of class 9 on a real federation: 3 SuperNodes on loopback",
              COMMON, ("retrain", "quickdrop"), {"forget-class": "9"}, clients=3,
              variants={"qd-app": {}, "Flower's defaults": {}},
              deployment={"qd-app": {}, "Flower's defaults": {"plain": True}}),
        Suite("decentralized", "Decentralized client unlearning: HDUS against main models alone and FedAvg",
              {key: value for key, value in COMMON.items() if key != "federaser-interval"}, ("hdus", "quickdrop"),
              {"forget-class": "", "forget-client": "0"}, decentralized=True),
    )
}


def config_text(settings: dict[str, Any]) -> str:
    """Run-config overrides in ``flwr run -c`` form."""
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else repr(v)}" for k, v in settings.items())
