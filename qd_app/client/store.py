"""The client-local stores: one file per experiment and partition, on the client's disk.

A synthetic store holds the client's synthetic images, the real augmentation samples chosen
with them, and metadata saying what they were made from (dataset, partitioning,
model architecture, experiment, class counts). The file is

    MAGIC | header length (8 bytes) | header (JSON) | payload (torch.save of the tensors)

where the header carries the format version, the payload's length and its SHA-256.
Files are written atomically (temporary file, fsync, rename), and a file whose
checksum does not match is refused, so a crash never leaves a set that is later
read as valid. HDUS's repository of models (:mod:`qd_app.client.hdus`) uses the same
format. Nothing in a store ever leaves the client.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes
from ..core.data import LabeledImages
from ..core.distillation import SyntheticSet
from ..errors import StoreError

MAGIC = b"QDSTORE\n"
FORMAT_VERSION = 1
SUFFIX = ".qdstore"


def store_path(store_dir: Path, experiment: str, partition_id: int) -> Path:
    """Where the store of one partition of one experiment lives."""
    return store_dir / experiment / f"partition-{partition_id}{SUFFIX}"


def save_store(path: Path, synthetic_set: SyntheticSet, metadata: dict[str, Any]) -> int:
    """Write a store atomically; returns its size in bytes."""
    return write_checked(path, {
        "synthetic-images": synthetic_set.synthetic.images.detach().cpu(),
        "synthetic-labels": synthetic_set.synthetic.labels.cpu(),
        "augmentation-images": synthetic_set.augmentation.images.detach().cpu(),
        "augmentation-labels": synthetic_set.augmentation.labels.cpu(),
    }, metadata)


def write_checked(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> int:
    """Write tensors and metadata in the store format, atomically; returns the file's size."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    payload = buffer.getvalue()
    header = json.dumps(
        {
            "format-version": FORMAT_VERSION,
            "payload-bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "metadata": metadata,
        },
        sort_keys=True,
    ).encode()
    content = MAGIC + len(header).to_bytes(8, "big") + header + payload
    atomic_write_bytes(path, content)
    return len(content)


def load_store(path: Path) -> tuple[SyntheticSet, dict[str, Any]]:
    """Read and verify a store; returns the synthetic set and its metadata (see :func:`read_checked`)."""
    tensors, metadata = read_checked(path)
    synthetic_set = SyntheticSet(
        LabeledImages(tensors["synthetic-images"], tensors["synthetic-labels"]),
        LabeledImages(tensors["augmentation-images"], tensors["augmentation-labels"]),
    )
    return synthetic_set, metadata


def read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by :func:`write_checked`: its tensors and metadata.

    Raises
    ------
    StoreError
        If the file is missing, not a store, of another format version, truncated or
        corrupt (checksum mismatch).
    """
    if not path.is_file():
        raise StoreError(f"no client store at {path}: run the training phase (phase=train or all) first")
    with open(path, "rb") as handle:
        header = _parse_header(path, handle.read(len(MAGIC) + 8), handle)
        payload = handle.read()
    if len(payload) != header["payload-bytes"] or hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise StoreError(f"store {path} is corrupt (checksum mismatch): delete it and train again")
    return torch.load(io.BytesIO(payload), weights_only=True), header["metadata"]


def check_identity(path: Path, stored: dict[str, Any], expected: dict[str, Any], kind: str = "store") -> None:
    """Refuse a ``kind`` of file (a store, HDUS's repository) made for another setup: any key
    of ``expected`` (dataset, model, partition, experiment, ...) it records otherwise."""
    differences = [
        f"{key} {stored.get(key)!r} (this run: {value!r})"
        for key, value in expected.items()
        if stored.get(key) != value
    ]
    if differences:
        raise StoreError(f"{kind} {path} was written for another setup: " + "; ".join(differences)
                         + ": run the training phase with these settings (phase=train), or restore this setup's file")


def _parse_header(path: Path, prefix: bytes, handle) -> dict[str, Any]:
    if len(prefix) < len(MAGIC) + 8 or not prefix.startswith(MAGIC):
        raise StoreError(f"{path} is not a qd_app synthetic store (or is truncated): delete it and train again")
    header_bytes = handle.read(int.from_bytes(prefix[len(MAGIC):], "big"))
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise StoreError(f"store {path} has a corrupt header: delete it and train again") from exc
    if header.get("format-version") != FORMAT_VERSION:
        raise StoreError(
            f"store {path} has format version {header.get('format-version')}, this app reads {FORMAT_VERSION}: "
            "train again (phase=train) with this version of the app"
        )
    return header
