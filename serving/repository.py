"""The model repository: ``<model_dir>/<name>/<version>/{model.onnx,model.json}``.

Every version is loaded (latest serves by default, every version is addressable). A version whose card
is missing or malformed, whose sha256 differs, or whose ONNX does not load is reported not-ready with
the reason; the others serve. ``scan()`` picks up new versions without a restart and swaps them in
atomically: requests already holding a ``LoadedModel`` finish on it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.batcher import DynamicBatcher
from serving.errors import ModelNotFound, ModelNotReady
from serving.metrics import observe_batch
from serving.model_card import INPUT_NAME, PROBS_NAME, CardError, ModelCard, file_sha256, read_card
from serving.settings import Settings

log = logging.getLogger("cnnserve.repository")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class DeviceError(RuntimeError):
    """CUDA was requested explicitly and is not usable."""


@dataclass
class LoadedModel:
    card: ModelCard
    path: Path
    session: ort.InferenceSession
    batcher: DynamicBatcher
    providers: list[str]
    device_note: str | None = None  # set when `auto` fell back to the CPU

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> int:
        return self.card.version


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    ready: bool
    reason: str = ""
    providers: list[str] = field(default_factory=list)


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if CUDA not in available:
            raise DeviceError(f"CNNSERVE_DEVICE=cuda but onnxruntime offers no CUDA provider (available: {available}); "
                              "install onnxruntime-gpu (the `gpu` extra) and check the CUDA libraries")
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if device == "cpu":
        return [CPU]
    raise DeviceError(f"CNNSERVE_DEVICE must be auto, cpu or cuda, not {device!r}")


class ModelRepository:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.model_dir)
        self._providers = providers_for(settings.device)
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._status: dict[tuple[str, int], VersionStatus] = {}
        self._lock = threading.Lock()  # serialises scans; readers never take it
        self.device_note: str | None = None
        self.scanned = False

    # --- loading -----------------------------------------------------------------------------------------
    def scan(self) -> list[str]:
        """Load versions not seen yet, drop versions removed from disk; returns what changed."""
        with self._lock:
            changes: list[str] = []
            on_disk = self._versions_on_disk()
            models = {name: dict(versions) for name, versions in self._models.items()}
            status = dict(self._status)
            for key in set(status) - set(on_disk):
                status.pop(key)
                dropped = models.get(key[0], {}).pop(key[1], None)
                if dropped is not None:
                    dropped.batcher.close()
                changes.append(f"removed {key[0]}/{key[1]}")
            for (name, version), path in sorted(on_disk.items()):
                if (name, version) in status:
                    continue
                try:
                    loaded = self._load(path, name, version)
                except Exception as exc:  # any failure: that version is not ready, the rest serve
                    reason = str(exc) or type(exc).__name__
                    log.error("model %s/%s not loaded: %s", name, version, reason)
                    status[(name, version)] = VersionStatus(name, version, False, reason)
                    changes.append(f"failed {name}/{version}")
                    continue
                models.setdefault(name, {})[version] = loaded
                status[(name, version)] = VersionStatus(name, version, True, loaded.device_note or "",
                                                        loaded.providers)
                log.info("loaded %s/%s on %s", name, version, loaded.providers[0])
                changes.append(f"loaded {name}/{version}")
            self._models = {n: v for n, v in models.items() if v}  # one atomic swap for readers
            self._status = status
            self.scanned = True
            return changes

    def _versions_on_disk(self) -> dict[tuple[str, int], Path]:
        if not self.root.is_dir():
            return {}
        found = {}
        for model_dir in self.root.iterdir():
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            for version_dir in model_dir.iterdir():
                if version_dir.is_dir() and version_dir.name.isdigit():
                    found[(model_dir.name, int(version_dir.name))] = version_dir
        return found

    def _load(self, path: Path, name: str, version: int) -> LoadedModel:
        card = read_card(path / "model.json")
        if (card.name, card.version) != (name, version):
            raise CardError(f"card says {card.name}/{card.version} but lives in {name}/{version}")
        onnx_path = path / "model.onnx"
        if not onnx_path.exists():
            raise CardError(f"{onnx_path} is missing")
        digest = file_sha256(onnx_path)
        if digest != card.sha256:
            raise CardError(f"sha256 of model.onnx is {digest}, the card says {card.sha256}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.threads_per_session
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=self._providers)
        used = session.get_providers()
        note = None
        if CUDA in self._providers and CUDA not in used:
            if self.settings.device == "cuda":
                raise DeviceError(f"{name}/{version}: CUDA provider requested but onnxruntime fell back to {used}")
            note = "CNNSERVE_DEVICE=auto: the CUDA provider did not load, running on CPU"
            log.warning("%s/%s: %s", name, version, note)
            self.device_note = note
        batching = card.batching
        max_batch = self.settings.max_batch_size or batching.max_batch_size
        delay_ms = self.settings.max_queue_delay_ms
        if delay_ms < 0:
            delay_ms = batching.max_queue_delay_ms
        def run(images: np.ndarray) -> np.ndarray:
            return session.run([PROBS_NAME], {INPUT_NAME: images})[0]

        batcher = DynamicBatcher(run, max_batch, delay_ms / 1000, observe=lambda n, q: observe_batch(name, n, q),
                                 name=name)
        return LoadedModel(card, path, session, batcher, used, note)

    # --- lookup ------------------------------------------------------------------------------------------
    def get(self, name: str, version: int | str | None = None) -> LoadedModel:
        versions = self._models.get(name)
        if version in (None, ""):
            if not versions:
                self._raise_missing(name, None)
            return versions[max(versions)]
        try:
            v = int(version)
        except (TypeError, ValueError):
            raise ModelNotFound(f"model version must be a positive integer, got {version!r}") from None
        if not versions or v not in versions:
            self._raise_missing(name, v)
        return versions[v]

    def _raise_missing(self, name: str, version: int | None) -> None:
        failed = [s for s in self._status.values() if s.name == name and not s.ready
                  and (version is None or s.version == version)]
        if failed:
            raise ModelNotReady(f"model {name}/{failed[0].version} is not ready: {failed[0].reason}")
        known = ", ".join(sorted({s.name for s in self._status.values()})) or "none"
        what = f"model {name!r}" + (f" version {version}" if version is not None else "")
        raise ModelNotFound(f"{what} not found; models: {known}")

    def latest(self) -> list[LoadedModel]:
        return [versions[max(versions)] for _, versions in sorted(self._models.items())]

    def all_loaded(self) -> list[LoadedModel]:
        return [m for _, versions in sorted(self._models.items()) for _, m in sorted(versions.items())]

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def statuses(self) -> list[VersionStatus]:
        return sorted(self._status.values(), key=lambda s: (s.name, s.version))

    @property
    def ready(self) -> bool:
        """True once the first scan has tried every version on disk and at least one model serves.

        A broken version does not hold the others back: it is reported in its own model readiness."""
        return self.scanned and bool(self._models)

    def close(self) -> None:
        for m in self.all_loaded():
            m.batcher.close()
