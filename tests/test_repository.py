"""Model repository behaviour without a server: device selection, versions, broken models."""

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import onnxruntime as ort
import pytest

from serving.errors import InvalidInput, ModelNotFound, ModelNotReady
from serving.model_card import file_sha256
from serving.repository import LOADING, DeviceError, ModelRepository, providers_for
from serving.settings import Settings
from tests.conftest import EXPORTS


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_requested_without_a_cuda_provider_fails_at_start_with_a_clear_message(tmp_path):
    with pytest.raises(DeviceError, match="CNNSERVE_DEVICE=cuda but onnxruntime offers no CUDA provider"):
        ModelRepository(Settings(model_dir=tmp_path, device="cuda"))
    assert providers_for("auto") == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="auto, cpu or cuda"):
        providers_for("tpu")


def test_versions_latest_and_lookup_errors(tmp_path):
    shutil.copytree(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    assert repo.scan().changes == ["loaded mnist-cnn/1"] and repo.ready
    assert repo.get("mnist-cnn").version == 1 and repo.get("mnist-cnn", "1").version == 1
    with pytest.raises(ModelNotFound, match=r"has no version 7; its versions: 1$"):
        repo.get("mnist-cnn", 7)
    assert repo.get("mnist-cnn", 1.0).version == 1  # a JSON number that is whole
    for written in ("+1", " 1", "1 ", "0_1", "\uff11", "01", "1.0", 1.5):  # not as version folders are named
        with pytest.raises(InvalidInput, match="positive integer"):
            repo.get("mnist-cnn", written)
    (tmp_path / "mnist-cnn" / "2").mkdir()  # a version without files: reported, the others serve
    assert repo.scan().changes[0].startswith("pending mnist-cnn/2")  # it may be still being copied
    assert repo.scan().changes == ["failed mnist-cnn/2"]  # the same files a poll later: judged
    with pytest.raises(ModelNotReady, match=r"model card .* is missing"):
        repo.get("mnist-cnn", 2)
    assert repo.get("mnist-cnn").version == 1
    shutil.rmtree(tmp_path / "mnist-cnn" / "2")
    assert repo.scan().changes == ["removed mnist-cnn/2"]
    repo.close()


def test_the_wide_session_for_lone_requests_does_not_spin_between_runs(tmp_path, monkeypatch):
    """onnxruntime's pool threads spin for the next run by default: between one lone client's requests that took a
    core from the client and the event loop (p50 about 80 µs longer at 1 client)."""
    sessions = []
    make_session = ModelRepository._session

    def recording(self, path, threads, spin=True):
        session = make_session(self, path, threads, spin)
        options, spins = session.get_session_options(), True
        with contextlib.suppress(RuntimeError):  # no entry: onnxruntime's default, spinning
            spins = options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        sessions.append((options.intra_op_num_threads, spins))
        return session

    monkeypatch.setattr(ModelRepository, "_session", recording)
    shutil.copytree(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu", workers=2, intra_op_threads=1, idle_threads=2))
    try:
        assert repo.scan().changes == ["loaded mnist-cnn/1"]
        assert sessions == [(1, True), (2, False)]  # the batcher's session as onnxruntime has it; the wide one
    finally:
        repo.close()


def copy_version(source: Path, target: Path, files: tuple[str, ...] = ("model.json", "model.onnx")) -> None:
    target.mkdir(parents=True, exist_ok=True)
    card = json.loads((source / "model.json").read_text())
    card["version"] = int(target.name)
    for name in files:
        if name == "model.json":
            (target / name).write_text(json.dumps(card))
        else:
            shutil.copy(source / name, target / name)


@pytest.mark.parametrize("first", ["model.json", "model.onnx"])
def test_a_half_copied_version_is_served_once_complete(tmp_path, first):
    source = EXPORTS / "mnist-cnn" / "1"
    copy_version(source, tmp_path / "mnist-cnn" / "1")
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    repo.scan()
    copy_version(source, tmp_path / "mnist-cnn" / "2", files=(first,))  # the other file is not there yet
    repo.scan()
    [status] = [s for s in repo.statuses() if s.version == 2]
    assert status.state == LOADING and repo.get("mnist-cnn").version == 1
    copy_version(source, tmp_path / "mnist-cnn" / "2")  # now complete
    assert "loaded mnist-cnn/2" in repo.scan().changes and repo.get("mnist-cnn").version == 2
    repo.close()


def test_a_failed_version_is_retried_when_its_files_change_and_fallbacks_are_reported(tmp_path):
    source = EXPORTS / "mnist-cnn" / "1"
    copy_version(source, tmp_path / "mnist-cnn" / "1")
    copy_version(source, tmp_path / "mnist-cnn" / "2")
    shutil.copytree(EXPORTS / "pneumoniamnist-cnn" / "1", tmp_path / "pneumoniamnist-cnn" / "1")
    card = tmp_path / "mnist-cnn" / "2" / "model.json"
    card.write_text(card.read_text().replace('"sha256": "', '"sha256": "0'))  # a wrong card
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu", strict_readiness=True))
    assert "failed mnist-cnn/2" in repo.scan().changes  # files present at start are judged at once
    assert repo.scan().changes == []  # unchanged files are not tried again
    assert repo.get("mnist-cnn").version == 1 and repo.ready  # strict: every model still has a version serving
    copy_version(source, tmp_path / "mnist-cnn" / "2")  # the card fixed
    assert "loaded mnist-cnn/2" in repo.scan().changes and repo.get("mnist-cnn").version == 2
    shutil.rmtree(tmp_path / "mnist-cnn" / "2")  # the serving version deleted: requests fall back to 1
    result = repo.scan()
    assert [m.version for m in result.removed] == [2]
    assert any(c.startswith("fallback mnist-cnn") for c in result.changes) and "mnist-cnn" in repo.fallbacks
    shutil.rmtree(tmp_path / "mnist-cnn")  # every version gone: strict readiness says the pod lacks a model
    repo.scan()
    assert not repo.ready and repo.get("pneumoniamnist-cnn").version == 1
    repo.close()


def test_a_graph_under_another_models_card_is_refused_with_the_reason(tmp_path):
    """The pneumonia graph (2 classes) published as mnist-cnn/2 with the mnist card (10 labels) and the graph's own
    sha256: the sha256 check passes, the graph's output shape does not; version 1 keeps serving."""
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    wrong = tmp_path / "mnist-cnn" / "2"
    copy_version(EXPORTS / "mnist-cnn" / "1", wrong, files=("model.json",))
    shutil.copy(EXPORTS / "pneumoniamnist-cnn" / "1" / "model.onnx", wrong / "model.onnx")
    card = json.loads((wrong / "model.json").read_text())
    card["sha256"] = file_sha256(wrong / "model.onnx")
    (wrong / "model.json").write_text(json.dumps(card))
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    assert repo.scan().changes == ["loaded mnist-cnn/1", "failed mnist-cnn/2"]
    with pytest.raises(ModelNotReady, match=r"answers probs of shape \[2\] per image, the card says \[10\]"):
        repo.get("mnist-cnn", 2)
    assert repo.get("mnist-cnn").version == 1
    repo.close()


def test_a_model_being_unloaded_or_loaded_is_never_reported_not_found(tmp_path):
    """Lookups while unload() and load() run in another thread (as the service runs them, off the event loop):
    each is served or refused as unloaded (503), never 'not found' (404, which clients do not retry)."""
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    repo.scan()
    for action in (repo.unload, repo.load, repo.unload, repo.load):
        worker = threading.Thread(target=action, args=("mnist-cnn",))
        worker.start()
        while worker.is_alive():
            with contextlib.suppress(ModelNotReady):  # unloaded: fine; ModelNotFound fails the test
                repo.get("mnist-cnn")
        worker.join()
    assert repo.get("mnist-cnn").version == 1
    repo.close()


def test_a_served_version_whose_files_change_is_loaded_again_or_dropped(tmp_path):
    # a fault probe: files replaced under a served version were never looked at again, so a worker restarted
    # later served the new files and the others the old ones under the same version
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "2")
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    repo.scan()
    served = repo.get("mnist-cnn", 2)
    copy_version(EXPORTS / "mnist-cnn" / "2", tmp_path / "mnist-cnn" / "2")  # other weights, a true card
    result = repo.scan()
    assert result.changes == ["reloaded mnist-cnn/2 (its files changed)"] and result.removed == [served]
    assert repo.get("mnist-cnn", 2).card.sha256 == file_sha256(tmp_path / "mnist-cnn" / "2" / "model.onnx")
    assert repo.scan().changes == []  # and not again while they stay as they are
    served = repo.get("mnist-cnn", 2)
    (tmp_path / "mnist-cnn" / "2" / "model.onnx").write_bytes(b"half written")  # maybe still being copied
    assert repo.scan().changes[0].startswith("pending replacement of mnist-cnn/2")
    assert repo.get("mnist-cnn", 2) is served  # the loaded files serve on meanwhile
    result = repo.scan()  # the same broken files a poll later: judged, and the old model goes
    assert result.changes[0] == "failed mnist-cnn/2" and result.removed == [served]
    assert repo.get("mnist-cnn").version == 1
    repo.close()


def test_only_whole_numbers_name_versions_and_nothing_else_breaks_a_scan(tmp_path):
    # "²".isdigit() is True but int("²") raises: every scan failed, and a worker starting crash-looped
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "3")
    for odd in ("²", "03", "-1", "1.0", "latest"):
        (tmp_path / "mnist-cnn" / odd).mkdir()
    (tmp_path / "mnist-cnn" / "4").write_text("a file, not a directory")
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    assert repo.scan().changes == ["loaded mnist-cnn/3"]
    assert [(s.name, s.version) for s in repo.statuses()] == [("mnist-cnn", 3)]
    repo.close()


def test_a_load_retries_failed_versions_in_every_worker_however_soon_it_follows_an_unload(tmp_path, monkeypatch):
    # the shared state was the unloaded set alone: an unload and a load back to back left it as it was by the time
    # the other worker's poller read it, so only the answering worker retried the model's failed versions
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this test's own shared files
    (tmp_path / "tmp").mkdir()
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "repo" / "mnist-cnn" / "1")
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "repo" / "mnist-cnn" / "2")
    settings = Settings(model_dir=tmp_path / "repo", device="cpu")
    answering, other = ModelRepository(settings), ModelRepository(settings, worker_slot=1)
    answering.scan()
    load, attempts = other._load, []

    def fails_once(path, name, version):  # a read that failed once in this worker (say, a flaky mount)
        attempts.append(version)
        if attempts.count(2) == 1 and version == 2:
            raise OSError("read failed")
        return load(path, name, version)

    monkeypatch.setattr(other, "_load", fails_once)
    other.scan()
    assert other.get("mnist-cnn").version == 1  # version 2 failed here, unchanged files are not tried again
    answering.unload("mnist-cnn")
    answering.load("mnist-cnn")
    assert other.unloaded_changed()
    other.scan()  # what its poller does when the shared file changes
    assert other.get("mnist-cnn").version == 2
    answering.close()
    other.close()


def test_a_repository_renamed_away_for_a_while_unloads_nothing(tmp_path):
    # swapping a whole repository with two renames left no root for a moment, and a scan then unloaded every model
    root = tmp_path / "repo"
    copy_version(EXPORTS / "mnist-cnn" / "1", root / "mnist-cnn" / "1")
    copy_version(EXPORTS / "pneumoniamnist-cnn" / "1", root / "pneumoniamnist-cnn" / "1")
    repo = ModelRepository(Settings(model_dir=root, device="cpu"))
    repo.scan()
    served = repo.get("mnist-cnn")
    root.rename(tmp_path / "elsewhere")
    assert repo.scan().changes == [] and repo.get("mnist-cnn") is served and repo.ready
    assert repo.unload("pneumoniamnist-cnn").changes == ["removed pneumoniamnist-cnn/1"]  # unloads still apply
    (tmp_path / "elsewhere").rename(root)
    assert repo.scan().changes == [] and repo.get("mnist-cnn") is served  # the same files: nothing to do
    shutil.rmtree(root / "mnist-cnn")  # a root that can be listed says what is gone
    assert repo.scan().changes == ["removed mnist-cnn/1"]
    repo.close()


@pytest.mark.timeout(60)
def test_a_pipe_or_device_in_place_of_a_model_file_fails_that_version_without_blocking_scans(tmp_path):
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "2", files=("model.json",))
    os.mkfifo(tmp_path / "mnist-cnn" / "2" / "model.onnx")  # opening it for reading waits for a writer
    (tmp_path / "mnist-cnn" / "3").mkdir()
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "3", files=("model.onnx",))
    (tmp_path / "mnist-cnn" / "3" / "model.json").symlink_to("/dev/zero")  # never ends
    repo = ModelRepository(Settings(model_dir=tmp_path, device="cpu"))
    done = threading.Event()
    threading.Thread(target=lambda: (repo.scan(), done.set()), daemon=True).start()
    assert done.wait(20), "the scan blocked on a pipe or a device"
    assert repo.get("mnist-cnn").version == 1
    for version in (2, 3):
        with pytest.raises(ModelNotReady, match="is not a regular file"):
            repo.get("mnist-cnn", version)
    repo.close()


def test_a_worker_knows_which_others_have_not_applied_its_last_load_or_unload(tmp_path, monkeypatch):
    # what DataPlane.load / unload wait on before answering: a worker that has never started is not waited for;
    # one that scanned before the change is, until its next scan, and so is one that started and has not finished
    # its first scan (which may have read the state from before the change: a flaky test showed it serving on)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this test's own shared files
    (tmp_path / "tmp").mkdir()
    copy_version(EXPORTS / "mnist-cnn" / "1", tmp_path / "repo" / "mnist-cnn" / "1")
    settings = Settings(model_dir=tmp_path / "repo", device="cpu", workers=4)
    answering, other = ModelRepository(settings), ModelRepository(settings, worker_slot=1)  # slot 3: never starts
    answering.scan()
    other.scan()
    assert answering.workers_behind() == 0
    starting = ModelRepository(settings, worker_slot=2)  # its first scan not done yet
    answering.unload("mnist-cnn")
    assert answering.workers_behind() == 2 and other.workers_behind() == 0  # other is behind, not ahead
    other.scan()
    starting.scan()
    assert answering.workers_behind() == 0
    answering.load("mnist-cnn")
    assert answering.workers_behind() == 2
    other.scan()
    starting.scan()
    assert answering.workers_behind() == 0 and other.get("mnist-cnn").version == 1


def test_unloads_at_once_from_many_threads_are_all_kept(tmp_path, monkeypatch):
    # a read-modify-write of the shared state without a lock: two calls at once each wrote over the other's change
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    names = [f"model-{i}" for i in range(16)]
    for name in names:
        (tmp_path / "repo" / name).mkdir(parents=True)  # a model on disk, no version yet: it may be unloaded
    workers = [ModelRepository(Settings(model_dir=tmp_path / "repo", device="cpu"), worker_slot=i % 2)
               for i in range(len(names))]
    start = threading.Barrier(len(names))

    def unload(repo: ModelRepository, name: str) -> None:
        start.wait()
        repo.unload(name)

    threads = [threading.Thread(target=unload, args=pair) for pair in zip(workers, names, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    unloaded, _, generation = workers[0]._read_unloaded()
    assert unloaded == set(names) and generation == len(names)
