"""The wire protocol between the ServerApp and the ClientApp: message types and record keys.

Both sides import this module and nothing else of each other. A message carries
everything its task needs (the model, the stage's settings); the run and node config
say only what the run is (dataset, model architecture, partition, seed, store scale,
folders) and how a node computes (device, evaluation batch size).
Replies carry model parameters and metrics only: never data, labels or synthetic images.

Message types are Flower's ``train``, ``query`` and ``evaluate``, optionally followed by
an action (``train.unlearn``); the ClientApp registers one handler per action
(``@app.train(UNLEARN)``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

# ----------------------------------------------------------------- message types
# train.<action>: the client returns a model and a MetricRecord with NUM_EXAMPLES
DISTILL = "distill"  # local SGD that also distils the data into the client's store (QuickDrop training)
UNLEARN = "unlearn"  # gradient ascent on the forget data
RECOVER = "recover"  # SGD on the retain data
RELEARN = "relearn"  # SGD with relearned classes or clients back in
# HDUS (decentralised: one model per client, the server only relays)
SEED = "seed"  # train.seed: train the client's main model, distil its seed model; reply: the seed model
KEEP_SEEDS = "keep_seeds"  # evaluate.keep_seeds: keep the neighbours' seed models the message carries
DROP_SEEDS = "drop_seeds"  # evaluate.drop_seeds: delete forgotten clients' seed models (a forgotten client: its state)
ENSEMBLE = "ensemble"  # evaluate.ensemble: test accuracy of the main model alone and of the ensemble
# query.<action>
ACTIVATION_STATS = "activation_stats"  # FU-MP: per-class activation sums of the prunable units


def message_type(category: str, action: str | None = None) -> str:
    """``category`` (``train``, ``query``, ``evaluate``) or ``category.action``."""
    return category if action is None else f"{category}.{action}"


TRAIN = MessageType.TRAIN  # plain local SGD (FedAvg training, Retrain-Or, FedEraser, S2U)
QUERY = MessageType.QUERY  # the client's inventory
EVALUATE = MessageType.EVALUATE  # accuracy on the client's own training data

# ----------------------------------------------------------------- record names
ARRAYS = "arrays"
CONFIG = "config"
DESCRIPTION = "description"  # what a reply's model is (HDUS: the main model's architecture)
METRICS = "metrics"
INVENTORY = "inventory"
STATISTICS = "statistics"

# ----------------------------------------------------------------- ConfigRecord keys
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
# local SGD of a stage
LR = "lr"
EPOCHS = "epochs"
BATCH_SIZE = "batch-size"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"
MAX_STEPS = "max-steps"
# in-situ distillation
DISTILL_LR = "distill-lr"
DISTILL_MOMENTUM = "distill-momentum"
DISTILL_BATCH = "distill-batch"
FINETUNE_STEPS = "finetune-steps"
NEW_STORE = "new-store"  # the client's first round of this training: it starts a new synthetic set
# what a stage trains on
DATA = "data"  # SYNTHETIC or ORIGINAL
SYNTHETIC = "synthetic"  # the client's store: synthetic images + real augmentation samples
ORIGINAL = "original"  # the client's training data
EXCLUDE_CLASSES = "exclude-classes"
RELEARN_CLASSES = "relearn-classes"
FORGET_CLASSES = "forget-classes"
FORGET_EVERYTHING = "forget-everything"  # client-level: every sample of the source is forget data
UNSEEN_LOSS_QUANTILES = "unseen-loss-quantiles"  # per-class loss quantiles on unseen data: client-level ascent's goal
PRUNE_TARGET = "prune-target"  # FU-MP: features or channels
# HDUS: the run settings of the same names, and the partitions whose seed models are deleted
HDUS_SETTINGS = ("hdus-seed-model", "hdus-reference", "hdus-reference-size", "hdus-lambda", "hdus-temperature",
                 "hdus-epochs", "hdus-distill-epochs", "hdus-distill-lr")
DROP_PARTITIONS = "drop-partitions"
MAIN_MODEL = "main-model"  # the architecture of a client's main model (in a seed reply's ConfigRecord)

# ----------------------------------------------------------------- MetricRecord keys
NUM_EXAMPLES = "num-examples"  # aggregation weight: the size of the data the client used
SAMPLE_GRADIENTS = "sample-gradients"  # per-sample gradient computations
COMPUTE_SECONDS = "compute-seconds"  # the client's local work
DISTILL_SECONDS = "distill-seconds"  # the part of it spent on synthetic images
PEAK_MEMORY = "peak-memory-mb"  # the client process's peak resident memory so far
TRAIN_LOSS = "train-loss"
MATCH_DISTANCE = "match-distance"
STORE_BYTES = "store-bytes"
SYNTHETIC_NEAREST = "synthetic-nearest"  # mean RMS pixel distance of a synthetic image to its closest real one
SYNTHETIC_NEAREST_MIN = "synthetic-nearest-min"  # the smallest such distance
SYNTHETIC_COPIES = "synthetic-copies"  # synthetic images that are exact copies of a real image
CORRECT = "correct"
ACCURACY = "accuracy"
COUNTS = "counts"  # FU-MP: samples per class
MAIN_ACCURACY = "main-accuracy"  # HDUS: test accuracy of the client's main model alone
ENSEMBLE_ACCURACY = "ensemble-accuracy"  # HDUS: test accuracy of the client's ensemble
CLASS_CORRECT = "class-correct"  # HDUS: the ensemble's correct test predictions per class
SEEDS_HELD = "seeds-held"  # HDUS: the partitions whose seed models a client holds
SEEDS_DROPPED = "seeds-dropped"  # HDUS: the partitions whose seed models (own: repository) a client deleted


def seed_record(partition_id: int) -> str:
    """HDUS: the name of the ArrayRecord that carries one partition's seed model."""
    return f"seed-{partition_id}"


def layer_key(index: int) -> str:
    """FU-MP: the MetricRecord key of one prunable layer's per-class activation sums."""
    return f"layer-{index}"


# ----------------------------------------------------------------- inventory keys (ConfigRecord)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
CLASS_COUNTS = "class-counts"
STORE_STATUS = "store-status"  # "ok", "missing" or why the store cannot be used
SYNTHETIC_COUNTS = "synthetic-counts"
STORE_STATUS_OK = "ok"
STORE_STATUS_MISSING = "missing"


# ----------------------------------------------------------------- packed arrays
# On a real federation every array of a message travels as an object of its own, one HTTP
# exchange each; a model's dozen tensors then cost seconds per round. The deployment Grid
# therefore sends each ArrayRecord as one array of bytes (and the ClientApp answers in
# kind), with its keys, dtypes and shapes in a ConfigRecord beside it.
PACKED = "packed"
LAYOUT_SUFFIX = ".layout"


def pack_arrays(content: RecordDict) -> RecordDict:
    """``content`` with every ArrayRecord packed into one byte array (see above)."""
    packed: dict[str, Any] = {}
    for name, record in content.items():
        if not isinstance(record, ArrayRecord) or name.endswith(LAYOUT_SUFFIX):
            packed[name] = record
            continue
        arrays = {key: array.numpy() for key, array in record.items()}
        layout = [[key, value.dtype.str, list(value.shape)] for key, value in arrays.items()]
        data = b"".join(np.ascontiguousarray(value).tobytes() for value in arrays.values())
        packed[name] = ArrayRecord({PACKED: Array(np.frombuffer(data, dtype=np.uint8))})
        packed[name + LAYOUT_SUFFIX] = ConfigRecord({PACKED: json.dumps(layout)})
    return RecordDict(packed)


def unpack_arrays(content: RecordDict) -> RecordDict:
    """Inverse of :func:`pack_arrays` (content without packed arrays is returned as it is)."""
    if not is_packed(content):
        return content
    unpacked: dict[str, Any] = {}
    for name, record in content.items():
        if name.endswith(LAYOUT_SUFFIX):
            continue
        if name + LAYOUT_SUFFIX not in content:
            unpacked[name] = record
            continue
        data, offset, arrays = record[PACKED].numpy().tobytes(), 0, {}
        for key, dtype, shape in json.loads(str(content[name + LAYOUT_SUFFIX][PACKED])):
            count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            arrays[key] = Array(np.frombuffer(data[offset:offset + count], dtype=dtype).reshape(shape).copy())
            offset += count
        unpacked[name] = ArrayRecord(arrays)
    return RecordDict(unpacked)


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` carries packed arrays."""
    return any(name.endswith(LAYOUT_SUFFIX) for name in content)
