"""The user's Flower configuration (``$FLWR_HOME/config.toml``, default ``~/.flwr``): the named
SuperLink connection that ``flwr run . <name>`` uses."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from ..atomic import atomic_write_text
from ..errors import ConfigError


def flower_config_path() -> Path:
    """Where ``flwr`` reads its connections."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "config.toml"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}): fix or remove it, then run again") from None


def register(name: str, address: str, root_certificates: Path | None) -> Path:
    """Add or replace connection ``name`` (TLS with ``root_certificates``, else insecure); the
    rest of the file stays as it was."""
    path = flower_config_path()
    config = _read(path)
    connection: dict[str, Any] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates.resolve())
    config.setdefault("superlink", {})[name] = connection
    atomic_write_text(path, tomli_w.dumps(config))
    return path


def unregister(name: str, address: str) -> None:
    """Remove connection ``name`` if it still points at ``address`` (the user may have changed it)."""
    path = flower_config_path()
    config = _read(path)
    superlink = config.get("superlink", {})
    if isinstance(superlink.get(name), dict) and superlink[name].get("address") == address:
        del superlink[name]
        if superlink.get("default") == name:
            del superlink["default"]
        atomic_write_text(path, tomli_w.dumps(config))
