"""Shared fixtures: real data when ../shared/data exists, generated files in the same formats otherwise."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.fixtures import write_medmnist, write_mnist
from tests.server import HEADER_TIMEOUT_S, MAX_BYTES, MAX_IMAGES, start_server

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CNNSERVE_SHARED_DATA", ROOT.parent / "shared" / "data"))
EXPORTS = ROOT / "exports"

# flags covering every task type and shape: grey binary, RGB ordinal, grey multi-label, RGB multi-class, 3D
FIXTURE_FLAGS = ("pneumoniamnist", "retinamnist", "chestmnist", "pathmnist", "organmnist3d", "adrenalmnist3d")


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with generated MNIST and MedMNIST files in the packages' own layouts."""
    root = tmp_path_factory.mktemp("data")
    write_mnist(root)
    for flag in FIXTURE_FLAGS:
        write_medmnist(root, flag)
    write_medmnist(root, "pneumoniamnist", size=64)
    return root


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _writable_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the unpacked-MNIST cache of read-only data dirs out of the user's home."""
    from training import data

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path_factory.getbasetemp() / "cache")


@pytest.fixture(scope="session")
def repo(fixture_data, tmp_path_factory) -> Path:
    """The shipped models plus a tiny 3D and a tiny RGB model exported from fixture data."""
    root = tmp_path_factory.mktemp("repo")
    for model in EXPORTS.iterdir():
        if model.is_dir():
            shutil.copytree(model, root / model.name)
    from tests.test_train import tiny
    from training.export import export_checkpoint
    from training.train import CHECKPOINT, train

    runs = tmp_path_factory.mktemp("runs")
    for flag in ("organmnist3d", "retinamnist"):
        train(tiny(flag, epochs=1), runs / flag, fixture_data, download=False, quiet=True, report=False)
        export_checkpoint(runs / flag / CHECKPOINT, root, name=f"{flag}-tiny", data_dir=fixture_data, download=False)
    return root


@pytest.fixture(scope="session")
def server(repo, tmp_path_factory):
    srv = start_server(repo, tmp_path_factory.mktemp("log") / "server.log", max_images_per_request=MAX_IMAGES,
                       max_request_bytes=MAX_BYTES, poll_interval_s=0.5, header_timeout_s=HEADER_TIMEOUT_S)
    yield srv
    srv.stop()
