"""What may leave a client: model parameters and small metrics, nothing else.

:func:`audit_reply` checks one reply a ClientApp sends; the in-process grid
(``tests/inprocess.py``) calls it on every reply of every in-process test, so each method's
whole lifecycle (train, unlearn, recover, relearn, HDUS's exchange, FU-MP's statistics) is
audited: arrays must be parameters of the model the run exchanges (same names, same shapes)
and no larger than it; metrics and config values scalars, short strings, or lists no longer
than the classes or partitions (per-class counts, partitions held), except FU-MP's
per-class sums over a layer's units in the ``statistics`` record; everything beside the
arrays within a small budget. Images, labels, per-sample values and synthetic sets fail
one of those checks.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Message

from qd_app import protocol
from qd_app.config import RunConfig
from qd_app.core.models import ModelSpec, build_model

METRICS_BUDGET = 16 * 1024  # bytes a reply may carry beside its model and FU-MP's statistics
LONGEST_STRING = 1000  # a description or an error message (e.g. why a store is unusable)


@lru_cache(maxsize=64)
def _allowed_model(frozen_config: tuple) -> tuple[dict[str, tuple], int, int, int]:
    """The one model whose parameters a client of this run may send (HDUS: the seed model; its
    main model never leaves the client; every other method: the global model), its size in
    bytes, the number of classes and the longest per-unit statistic (classes x a layer's units)."""
    config = RunConfig.from_run_config(dict(frozen_config))
    spec = (ModelSpec.from_architecture(config.hdus_seed_model, config) if config.method == "hdus"
            else ModelSpec.from_config(config))
    state = build_model(spec).state_dict()
    size = sum(value.numel() * value.element_size() for value in state.values())
    widest = max(max(value.shape) for value in state.values() if value.dim())
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    return shapes, size, spec.num_classes, widest * spec.num_classes


def audit_reply(reply: Message, run_config: dict, node_config: dict) -> None:
    """Raise AssertionError if ``reply`` carries anything but model parameters and small metrics."""
    if reply.has_error():
        return
    model, model_bytes, classes, per_unit = _allowed_model(tuple(sorted(run_config.items())))
    longest_list = max(classes, int(node_config.get("num-partitions", 0)))
    content, kind = reply.content, reply.metadata.message_type
    for name, arrays in content.array_records.items():
        shapes = {key: tuple(array.shape) for key, array in arrays.items()}
        assert shapes.items() <= model.items(), (
            f"{kind}: array record {name!r} is not a model's parameters: {sorted(shapes)[:4]}")
        size = sum(array.numpy().nbytes for array in arrays.values())
        assert size <= model_bytes, f"{kind}: array record {name!r} of {size} bytes, more than the model's"
    beside = 0
    for name, record in list(content.metric_records.items()) + list(content.config_records.items()):
        limit = per_unit if name == protocol.STATISTICS else longest_list
        for key, value in record.items():
            size = _checked_size(f"{kind}: {name}[{key!r}]", value, limit)
            beside += size if name != protocol.STATISTICS else 0
    assert beside <= METRICS_BUDGET, f"{kind}: {beside} bytes of metrics beside the model"


def _checked_size(where: str, value, longest_list: int) -> int:
    if isinstance(value, (bool, int, float)):
        return 8
    if isinstance(value, str):
        assert len(value) <= LONGEST_STRING, f"{where}: a string of {len(value)} characters"
        return len(value)
    assert isinstance(value, list), f"{where}: a {type(value).__name__} value"
    assert len(value) <= longest_list, f"{where}: a list of {len(value)} values (aggregates only)"
    assert all(isinstance(item, (bool, int, float)) for item in value), f"{where}: a list of non-numbers"
    return 8 * len(value)
