"""Run settings: one validated object built from Flower's run config.

Every setting is a kebab-case key of ``[tool.flwr.app.config]`` in ``pyproject.toml``
and a snake_case field of :class:`RunConfig`; the README documents them. Values
coming from ``flwr run -c`` are not type-checked by Flower, so all checks live here
and every failure names the setting, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .request import UnlearningRequest, parse_requests

DATASET_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "svhn": 10}
DATASET_NAMES = tuple(DATASET_CLASSES)
PARTITIONINGS = ("dirichlet", "iid")
PHASES = ("all", "train", "unlearn", "relearn", "serve")
MODEL_NAMES = ("convnet",)  # the global model; ARCHITECTURES also name MLPs
# Named architectures of per-client main models (client-models) and of HDUS's seed model:
# family, width, depth (a ConvNet's channels and blocks; an MLP's hidden units and layers).
ARCHITECTURES = {"convnet-s": ("convnet", 16, 2), "convnet-m": ("convnet", 32, 3), "convnet-l": ("convnet", 64, 3),
                 "mlp": ("mlp", 256, 2)}
HDUS_REFERENCES = ("holdout", "other", "noise")
HDUS_TOPOLOGIES = ("ring", "regular", "full")
MODEL_NORMS = ("instance", "batch", "none")
MODEL_POOLINGS = ("avg", "max", "none")
PRUNE_TARGETS = ("features", "channels")
_EXPERIMENT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# a registered method's name (qd_app.methods.REGISTRY resolves it) or an import path module:Class
_METHOD_PATTERN = re.compile(r"^([a-z0-9][a-z0-9-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    """Build the one error message format used for every bad setting."""
    return ConfigError(f"invalid setting {key}={value!r}: {allowed}")


def cache_root() -> Path:
    """Folder for the app's data, outputs and stores when no path is configured."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qd_app"


def resolve_dir(key: str, value: str, default_name: str) -> Path:
    """Turn a directory setting into an absolute path (empty: the cache default). Refused: a
    relative path (the app runs from an installed FAB in the SuperLink's working directory,
    where it would land somewhere unexpected), a file or a path below one."""
    if value == "":
        return cache_root() / default_name
    if "\0" in value:
        raise invalid(key, value, "must be a path without NUL characters")
    try:  # ~user of an unknown user raises RuntimeError
        path = Path(value).expanduser()
    except RuntimeError:
        raise invalid(key, value, "names the home folder of an unknown user") from None
    if not path.is_absolute():
        raise invalid(key, value, "must be an absolute path (or empty for the default)")
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
        blocked = not existing.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise invalid(key, value, f"must be a usable folder path: {exc.strerror}") from None
    if blocked:
        raise invalid(key, value, f"must be a folder (or a path where one can be made): {existing} is a file")
    return path


@dataclass(frozen=True)
class RunConfig:  # pylint: disable=too-many-instance-attributes
    """All run settings, validated. Field ``foo_bar`` is run-config key ``foo-bar``."""

    experiment: str = "default"
    output_dir: str = ""
    data_dir: str = ""
    dataset: str = "mnist"
    partitioning: str = "dirichlet"
    alpha: float = 0.1
    seed: int = 0
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    model: str = "convnet"
    model_depth: int = 3
    model_width: int = 32
    model_norm: str = "instance"
    model_pooling: str = "avg"
    device: str = "auto"
    eval_batch_size: int = 500
    node_wait_seconds: float = 600.0
    phase: str = "all"
    method: str = "quickdrop"
    forget_class: str = "9"
    forget_client: str = ""
    request_ids: str = ""
    store_dir: str = ""
    scale: int = 100
    distill_lr: float = 0.1
    distill_momentum: float = 0.5
    distill_batch: int = 4
    finetune_steps: int = 0
    unlearn_rounds: int = 1
    unlearn_lr: float = 0.02
    unlearn_epochs: int = 30
    unlearn_client_epochs: int = 1
    recover_rounds: int = 2
    recover_lr: float = 0.03
    recover_epochs: int = 1
    relearn_rounds: int = 2
    relearn_lr: float = 0.01
    relearn_epochs: int = 4
    federaser_interval: int = 0
    federaser_ratio: float = 0.5
    prune_fraction: float = 0.1
    prune_target: str = "features"
    s2u_scale: float = 0.1
    ispf_epochs: int = 8
    ispf_cycles: int = 5
    ispf_generator_steps: int = 2
    ispf_student_steps: int = 10
    ispf_batch: int = 64
    ispf_generator_width: int = 8
    ispf_generator_lr: float = 0.01
    ispf_student_lr: float = 0.1
    ispf_tau: float = 0.01
    ispf_temperature: float = 1.0
    ispf_recover_rounds: int = 0
    client_models: str = ""
    hdus_seed_model: str = "convnet-s"
    hdus_reference: str = "holdout"
    hdus_reference_size: int = 2000
    hdus_topology: str = "regular"
    hdus_degree: int = 4
    hdus_lambda: float = 0.25
    hdus_temperature: float = 3.0
    hdus_epochs: int = 3
    hdus_distill_epochs: int = 20
    hdus_distill_lr: float = 0.05

    def __post_init__(self) -> None:
        for field in fields(self):
            object.__setattr__(self, field.name, _coerce(field, getattr(self, field.name)))
        self._check()

    # pylint: disable-next=too-many-branches
    def _check(self) -> None:
        choices = {
            "dataset": DATASET_NAMES,
            "partitioning": PARTITIONINGS,
            "phase": PHASES,
            "model": MODEL_NAMES,
            "model-norm": MODEL_NORMS,
            "model-pooling": MODEL_POOLINGS,
            "prune-target": PRUNE_TARGETS,
            "hdus-seed-model": tuple(ARCHITECTURES),
            "hdus-reference": HDUS_REFERENCES,
            "hdus-topology": HDUS_TOPOLOGIES,
        }
        for key, allowed in choices.items():
            value = getattr(self, field_name(key))
            if value not in allowed:
                raise invalid(key, value, f"must be one of {', '.join(allowed)}")
        if not _METHOD_PATTERN.fullmatch(self.method):
            raise invalid("method", self.method, "must be a method's name (quickdrop, retrain, sga, ...) or the "
                          "import path of your own method, 'package.module:ClassName'")
        if not _EXPERIMENT_PATTERN.fullmatch(self.experiment) or len(self.experiment) > 200:
            raise invalid("experiment", self.experiment, "must be a folder name of letters, digits, '.', '_', '-' "
                          "(at most 200 characters)")
        if not self.alpha > 0:
            raise invalid("alpha", self.alpha, "must be > 0 (smaller is more non-IID)")
        if not 0.0 < self.fraction_train <= 1.0:
            raise invalid("fraction-train", self.fraction_train, "must be in (0, 1]")
        positive = (
            "num-server-rounds", "local-epochs", "batch-size", "model-depth", "model-width", "eval-batch-size",
            "scale", "distill-batch", "unlearn-rounds", "unlearn-epochs", "unlearn-client-epochs", "recover-epochs",
            "relearn-epochs", "ispf-epochs", "ispf-cycles", "ispf-generator-steps", "ispf-student-steps", "ispf-batch",
            "ispf-generator-width", "hdus-reference-size", "hdus-epochs", "hdus-distill-epochs",
        )
        for key in positive:
            if getattr(self, field_name(key)) < 1:
                raise invalid(key, getattr(self, field_name(key)), "must be >= 1")
        non_negative = (
            "local-steps", "seed", "momentum", "weight-decay", "distill-momentum", "finetune-steps",
            "recover-rounds", "relearn-rounds", "federaser-interval", "ispf-recover-rounds",
        )
        for key in non_negative:
            if getattr(self, field_name(key)) < 0:
                raise invalid(key, getattr(self, field_name(key)), "must be >= 0")
        for key in ("lr", "distill-lr", "unlearn-lr", "recover-lr", "relearn-lr", "ispf-generator-lr", "ispf-student-lr",
                    "ispf-temperature", "hdus-temperature", "hdus-distill-lr"):
            if not getattr(self, field_name(key)) > 0:
                raise invalid(key, getattr(self, field_name(key)), "must be > 0")
        if not self.node_wait_seconds >= 0:
            raise invalid("node-wait-seconds", self.node_wait_seconds, "must be >= 0")
        for key in ("federaser-ratio", "prune-fraction", "s2u-scale", "ispf-tau"):
            if not 0.0 < getattr(self, field_name(key)) <= 1.0:
                raise invalid(key, getattr(self, field_name(key)), "must be in (0, 1]")
        if not 0.0 <= self.hdus_lambda <= 1.0:
            raise invalid("hdus-lambda", self.hdus_lambda, "must be in [0, 1] (the main model's weight in the ensemble)")
        if self.hdus_degree < 2:
            raise invalid("hdus-degree", self.hdus_degree, "must be >= 2 (each client's number of neighbours)")
        self.client_model(0)  # parsing the per-partition architectures validates them
        if not _DEVICE_PATTERN.fullmatch(self.device):
            raise invalid("device", self.device, "must be auto, cpu, cuda or cuda:<index>")
        self.serve_ids()  # parsing the ledger ids validates them
        self.resolved_run_config()  # resolving the directories validates them
        self.requests()  # parsing the request settings validates them

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's ``context.run_config`` (kebab-case keys).

        Missing keys take the defaults; unknown keys are refused.
        """
        known = {_key(field.name): field.name for field in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}"
            )
        return cls(**{known[key]: value for key, value in run_config.items()})

    def to_run_config(self) -> dict[str, Any]:
        """The settings as kebab-case run-config keys (what results.json records)."""
        return {_key(field.name): getattr(self, field.name) for field in fields(self)}

    def resolved_run_config(self) -> dict[str, Any]:
        """:meth:`to_run_config` with the directories as the absolute paths in use."""
        return {
            **self.to_run_config(),
            "output-dir": str(self.output_path.parent),
            "data-dir": str(self.data_path),
            "store-dir": str(self.store_path),
        }

    def requests(self) -> list[UnlearningRequest]:
        """The unlearning requests of ``forget-class`` / ``forget-client``, in order.

        Client ids are checked against the federation's size once it is known.
        """
        if self.forget_class and self.forget_client:
            raise ConfigError(
                f"forget-class={self.forget_class!r} and forget-client={self.forget_client!r} are both set: "
                "a run serves one kind of request (set forget-class='' for client-level unlearning)"
            )
        if self.forget_client:
            return parse_requests("forget-client", self.forget_client, "client")
        num_classes = DATASET_CLASSES[self.dataset]
        return parse_requests("forget-class", self.forget_class, "class", limit=num_classes, seed=self.seed)

    def serve_ids(self) -> list[int]:
        """The ledger ids ``request-ids`` names for ``phase=serve`` (empty: every pending request)."""
        text = self.request_ids.strip()
        if not text:
            return []
        if self.phase != "serve":
            raise invalid("request-ids", self.request_ids, f"is read by phase=serve only (this run has "
                          f"phase={self.phase!r}): set it empty")
        try:
            ids = [int(part) for part in text.split(",")]
        except ValueError:
            ids = []
        if not ids or min(ids) < 1 or len(set(ids)) != len(ids):
            raise invalid("request-ids", self.request_ids, "must be ledger ids >= 1 separated by ',', each once "
                          "(see qd-app requests list), or empty for every pending request")
        return ids

    def client_model(self, partition_id: int) -> str | None:
        """The main-model architecture ``client-models`` gives a partition (cycled over the
        partitions), or None when it is empty (every client has the run's ``model``)."""
        names = [name.strip() for name in self.client_models.split(",")] if self.client_models.strip() else []
        unknown = [name for name in names if name not in ARCHITECTURES]
        if unknown:
            raise invalid("client-models", self.client_models, "must be architecture names separated by ',' "
                          f"(one per partition, cycled), each one of {', '.join(ARCHITECTURES)}")
        return names[partition_id % len(names)] if names else None

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def output_path(self) -> Path:
        """Absolute folder of this experiment's outputs: ``output-dir/<experiment>``."""
        return resolve_dir("output-dir", self.output_dir, "outputs") / self.experiment

    @property
    def data_path(self) -> Path:
        """Absolute folder holding the datasets."""
        return resolve_dir("data-dir", self.data_dir, "data")

    @property
    def store_path(self) -> Path:
        """Absolute folder holding the clients' synthetic stores."""
        return resolve_dir("store-dir", self.store_dir, "stores")


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def field_name(key: str) -> str:
    return key.replace("-", "_")


def as_int(key: str, value: Any) -> int:
    """``value`` as an int, refused unless it is a whole number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _whole(value):
        raise invalid(key, value, "must be an integer")
    return int(value)


def _whole(value: int | float) -> bool:
    return isinstance(value, int) or (math.isfinite(value) and value.is_integer())


def _finite(value: int | float) -> bool:  # also for an int beyond float's range
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """Check a value against the field's declared type (int, float or str)."""
    key = _key(field.name)
    if field.type == "int":
        return as_int(key, value)
    if field.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise invalid(key, value, "must be a finite number")
        return float(value)
    if not isinstance(value, str):
        raise invalid(key, value, "must be a string")
    return value
