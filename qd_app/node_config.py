"""Node settings: what a ClientApp learns from its SuperNode's ``node_config``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import ARCHITECTURES, RunConfig, as_int, field_name, invalid, resolve_dir
from .errors import ConfigError


@dataclass(frozen=True)
class NodeSettings:
    """What a ClientApp learns from its SuperNode's ``node_config``.

    ``partition-id`` and ``num-partitions`` pick the client's share of the data; in a
    deployment a SuperNode may also set ``data-dir`` and ``store-dir`` (its own disk),
    which replace the run config's values on that node, and ``worker=true``: its
    ClientApps hand their work to one long-lived process of the node (which keeps torch,
    the data and the store loaded between messages), instead of each loading them anew.
    """

    partition_id: int
    num_partitions: int
    data_dir: str | None = None
    store_dir: str | None = None
    worker: bool = False
    client_model: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Read and check the node's settings."""
        for key in ("partition-id", "num-partitions"):
            if key not in node_config:
                raise ConfigError(
                    f"node_config has no {key}: start each SuperNode with "
                    "--node-config \"partition-id=<i> num-partitions=<n>\""
                )
        num_partitions = as_int("num-partitions", node_config["num-partitions"])
        partition_id = as_int("partition-id", node_config["partition-id"])
        if num_partitions < 1:
            raise invalid("num-partitions", num_partitions, "must be >= 1")
        if not 0 <= partition_id < num_partitions:
            raise invalid("partition-id", partition_id, f"must be in [0, {num_partitions - 1}]")
        paths = {}
        for key in ("data-dir", "store-dir"):
            if key in node_config:
                paths[field_name(key)] = str(node_config[key])
                resolve_dir(key, paths[field_name(key)], key)
        worker = node_config.get("worker", False)
        if not isinstance(worker, bool):
            raise invalid("worker", worker, "must be true or false")
        client_model = node_config.get("client-model")
        if client_model is not None and client_model not in ARCHITECTURES:
            raise invalid("client-model", client_model, f"must be one of {', '.join(ARCHITECTURES)}")
        return cls(partition_id, num_partitions, **paths, worker=worker, client_model=client_model)

    def apply(self, config: RunConfig) -> RunConfig:
        """The run config as this node sees it (node-level paths and architecture replace run-level ones)."""
        paths = {"data_dir": self.data_dir, "store_dir": self.store_dir, "client_models": self.client_model}
        return config.replace(**{name: value for name, value in paths.items() if value is not None})
