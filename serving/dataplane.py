"""The dataplane: everything the protocol doors share, behind one object.

Every door (``service`` for BentoML's ``/classify`` and ``/predict``, ``oip_rest``, ``oip_grpc``) is a codec
between its protocol and ``DataPlane``: it decodes a request into ``(model, uint8 array)``, calls
``DataPlane.infer`` and encodes the answer. Model lookup (with the single-model default), readiness, server
and model metadata, the Triton model configuration and the statistics live here, so every door answers the
same question the same way; errors are ``ServingError``s, which carry their own HTTP and gRPC codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from serving import __version__
from serving.errors import InvalidInput, ModelNotFound, ModelNotReady, PayloadTooLarge, ServingError
from serving.loop_lag import LoopLag
from serving.metrics import observe_request
from serving.model_card import INPUT_NAME, PROBS_NAME, ModelCard
from serving.repository import LoadedModel, ModelRepository, ScanResult
from serving.settings import Settings
from serving.worker_stats import SharedStats, add

log = logging.getLogger("cnnserve.dataplane")
SERVER_NAME = "cnnserve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "health", "statistics",
              "model_repository"]
NO_DURATION = {"count": 0, "ns": 0}
PLATFORM = "onnxruntime_onnx"
FOLLOW_WAIT_S = 5.0  # a load / unload waits at most this long for the other workers to apply it
FOLLOW_POLL_S = 0.01


def expected_shape(card: ModelCard) -> str:
    return f"[N, {', '.join(map(str, card.input.shape))}]"


def check_image_count(count: int, max_images: int) -> None:
    """Refuse a batch by its declared size, before any of its data is decoded."""
    if count == 0:
        raise InvalidInput("empty batch: at least one image is needed")
    if count > max_images:
        raise PayloadTooLarge(f"batch of {count} images is over the limit of {max_images} per request")


def validate_batch(card: ModelCard, images: np.ndarray, max_images: int) -> np.ndarray:
    """Check a batch of images against the card; returns it C-contiguous."""
    if images.dtype != np.uint8:
        raise InvalidInput(f"input datatype must be UINT8 (uint8), got {images.dtype}")
    if images.ndim != len(card.input.shape) + 1 or list(images.shape[1:]) != card.input.shape:
        raise InvalidInput(f"input shape {list(images.shape)} does not match model {card.name}: "
                           f"expected {expected_shape(card)} ({card.layout})")
    check_image_count(images.shape[0], max_images)
    return np.ascontiguousarray(images)


class DataPlane:
    """One worker's models, as every door sees them."""

    def __init__(self, repository: ModelRepository, settings: Settings,
                 shared_stats: SharedStats | None = None) -> None:
        """``shared_stats``: where the workers of this server share their statistics (None: this worker's only)."""
        self.repository, self.settings, self.shared_stats = repository, settings, shared_stats
        self.draining = False  # shutting down: not ready, though still serving
        # started on the worker's loop by the service
        self.loop_lag = LoopLag(settings.max_loop_lag_ms / 1000, settings.loop_lag_window_ms / 1000)
        self.inferring = 0  # inference requests in ``infer`` now, all doors and models
        self.on_scan: Callable[[ScanResult], Awaitable[None]] | None = None  # drains what a load/unload dropped

    def check_loop_lag(self, door: str, others: int = 0) -> None:
        """``LoopLag.check``, while other inference requests are in progress: in ``infer`` (any door), or ``others``
        that the door counts from before that (HTTP: admitted on their headers, their bodies still coming or being
        parsed). A lag that the worker's own last request caused (a large JSON body parsed, a 3D volume run) with
        nothing else in progress is no backlog, and refusing a lone client's next request would protect nobody (an
        outside probe: one client sending 64³ volumes one at a time was refused 503 after a request)."""
        if self.inferring or others:
            self.loop_lag.check(door)

    # --- lookup ------------------------------------------------------------------------------------------
    def model(self, name: str | None, version: int | str | None = None) -> LoadedModel:
        """The model ``name`` (latest version unless ``version``); without a name, the only model served."""
        if not name:
            loaded = self.repository.latest()
            if len(loaded) != 1:
                names = ", ".join(m.name for m in loaded) or "none loaded"
                raise InvalidInput(f"'model' is required: one of {names}")
            return loaded[0]
        return self.repository.get(name, version)

    # --- health ------------------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.repository.ready and not self.draining

    def readiness(self) -> dict[str, Any]:
        """``{"ready": bool}``, with the device note and the reasons of versions that are not ready."""
        repo = self.repository
        body: dict[str, Any] = {"ready": self.ready()}
        if repo.device_note:  # e.g. CNNSERVE_DEVICE=auto fell back to the CPU
            body["device_note"] = repo.device_note
        not_ready = {f"{s.name}/{s.version}": s.reason for s in repo.statuses() if not s.ready}
        if not_ready:
            body["not_ready"] = not_ready
        return body

    def model_ready(self, name: str, version: int | str | None = None) -> bool:
        """Whether that model (version) serves: False too when the repository has no such model or version, as
        Triton's gRPC ``ModelReady`` answers (a client polling readiness gets an answer, not an error);
        ``InvalidInput`` for a version that is not a number, or for no name while the server has not exactly one
        model (with one, no name means that one, as on every route)."""
        try:
            self.model(name, version)
        except (ModelNotReady, ModelNotFound):
            return False
        return True

    # --- metadata ----------------------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: int | str | None = None) -> dict[str, Any]:
        model = self.model(name, version)
        card = model.card
        return {
            "name": card.name,
            "versions": [str(v) for v in self.repository.versions(card.name)],
            "platform": PLATFORM,
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *card.input.shape]}],
            "outputs": [{"name": PROBS_NAME, "datatype": "FP32", "shape": [-1, *card.probs.shape]}],
            "parameters": {"task": card.task, "layout": card.layout, "labels": card.labels,
                           "providers": model.providers, "device_note": model.device_note or ""},
        }

    def model_config(self, name: str, version: int | str | None = None) -> dict[str, Any]:
        """A Triton model configuration (what perf_analyzer asks for), in Triton's JSON names."""
        model = self.model(name, version)
        card = model.card
        return {
            "name": card.name,
            "platform": PLATFORM,
            "backend": "onnxruntime",
            "version_policy": {"all": {}},  # every version on disk is loaded and addressable
            "max_batch_size": model.batcher.max_batch_size,
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8", "dims": card.input.shape}],
            "output": [{"name": PROBS_NAME, "data_type": "TYPE_FP32", "dims": card.probs.shape}],
            "dynamic_batching": {"max_queue_delay_microseconds": int(model.batcher.max_queue_delay_s * 1e6)},
        }

    def model_cards(self, name: str | None = None) -> dict[str, Any]:
        """The cards of the loaded versions and the status of every version (``GET /models``)."""
        repo = self.repository
        cards = [m.card.to_dict() | {"providers": m.providers, "device_note": m.device_note}
                 for m in repo.all_loaded() if name in (None, m.name)]
        status = [s.__dict__ for s in repo.statuses() if name in (None, s.name)]
        if name is not None and not status:
            raise ModelNotFound(f"model {name!r} not found")
        defaults = {m.name: m.version for m in repo.latest() if name in (None, m.name)}
        fallbacks = {n: why for n, why in repo.fallbacks.items() if name in (None, n)}
        return {"models": cards, "status": status, "default_versions": defaults, "fallbacks": fallbacks}

    # --- Triton's statistics and model repository extensions ----------------------------------------------
    def statistics(self, name: str | None = None, version: int | str | None = None) -> dict[str, Any]:
        """Triton's statistics of the loaded versions (of ``name``, of ``version``), fed by the batchers of every
        worker (``serving.worker_stats``: this worker's live, the others' at most a publishing interval old).

        Durations in ns, per request (per chunk of a split request): ``queue`` = time waiting for its batch,
        ``compute_input`` = joining the batch's inputs, ``compute_infer`` = the onnxruntime run of its batch,
        ``compute_output`` = handing the rows back; ``success`` = the whole time in the batcher; ``batch_stats``
        times the same three phases per run of each batch size. Counters never go back between two answers,
        whichever workers give them: each answer publishes its worker's counters before adding up."""
        self.publish_statistics()  # first: an answer from another worker after this one then counts what it adds up
        if version and not name:  # gRPC can send one without the other: every model's statistics were answered
            raise InvalidInput(f"statistics of version {version} need the model's name")
        if name:
            selected = [self.model(name, version)] if version else \
                [m for m in self.repository.all_loaded() if m.name == name] or [self.model(name)]
        else:
            selected = self.repository.all_loaded()
        found = {(m.name, m.version): m.batcher.stats() for m in selected}
        for key, snapshots in (self.shared_stats.others() if self.shared_stats else {}).items():
            if key in found if version else name in (None, key[0]):  # another worker's: only what was asked
                for snapshot in snapshots:
                    found[key] = add(found[key], snapshot) if key in found else snapshot
        return {"model_stats": [_triton_stats(n, v, stats) for (n, v), stats in sorted(found.items())]}

    def publish_statistics(self) -> None:
        """Share this worker's counters with the other workers (see ``serving.worker_stats``)."""
        if self.shared_stats:
            self.shared_stats.publish({(m.name, m.version): m.batcher.stats() for m in self.repository.all_loaded()})

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every version in the repository with its state (Triton's: READY; LOADING, judged again at the next scan;
        UNAVAILABLE, failed or unloaded) and reason."""
        return [{"name": s.name, "version": str(s.version) if s.version else "", "state": s.state,
                 "reason": s.reason} for s in self.repository.statuses() if s.ready or not ready_only]

    async def load(self, name: str) -> None:
        await self._apply(await asyncio.to_thread(self.repository.load, name))
        await self._every_worker_follows(f"load of {name}")

    async def unload(self, name: str) -> None:
        await self._apply(await asyncio.to_thread(self.repository.unload, name))
        await self._every_worker_follows(f"unload of {name}")

    async def _every_worker_follows(self, change: str) -> None:
        """Return once every other worker has applied this worker's last load / unload, as Triton answers once the
        change is done (an outside probe: right after an unload's answer, 2 of 8 readiness calls on fresh
        connections reached a worker still serving the model); after ``FOLLOW_WAIT_S`` it is logged instead."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + FOLLOW_WAIT_S
        while behind := self.repository.workers_behind():
            if loop.time() > give_up:
                log.warning("%s: %d other worker(s) had not followed after %.0f s", change, behind, FOLLOW_WAIT_S)
                return
            await asyncio.sleep(FOLLOW_POLL_S)

    async def _apply(self, result: ScanResult) -> None:
        if self.on_scan is not None:
            await self.on_scan(result)

    # --- inference ---------------------------------------------------------------------------------------
    async def infer(self, model: LoadedModel, images: np.ndarray, door: str,
                    deadline: float | None = None, admitted: bool = False) -> np.ndarray:
        """Validated, batched inference; records metrics. Returns float32 (N, K).

        ``deadline`` (``time.monotonic()`` seconds): when the caller needs the answer by; a request that
        cannot make it is refused (``DeadlineExceeded``) rather than computed for nobody. ``admitted``: the
        request passed the queue budget when its headers came in (see ``DynamicBatcher.infer``)."""
        t0 = time.perf_counter()
        self.inferring += 1
        try:
            images = validate_batch(model.card, images, self.settings.max_images_per_request)
            out = await model.batcher.infer(images, deadline, admitted)
        except ServingError as exc:
            observe_request(model.name, door, exc.outcome, time.perf_counter() - t0)
            exc.counted = True
            raise
        except Exception as exc:
            observe_request(model.name, door, "error", time.perf_counter() - t0)
            with contextlib.suppress(AttributeError):  # count_failure does not count it again
                exc.counted = True
            raise
        finally:
            self.inferring -= 1
        observe_request(model.name, door, "ok", time.perf_counter() - t0, len(images))
        return out


def count_refusal(exc: ServingError, door: str) -> None:
    """Count an inference request refused before ``DataPlane.infer`` took it (its protocol or data wrong, its model
    unknown or not ready) in ``cnnserve_requests_total``, under the model label "" (a name the client chose would
    grow the label set without bound); what ``infer`` refused is counted already. Only one in five bad requests
    was counted before (an outside probe)."""
    if not exc.counted:
        observe_request("", door, exc.outcome, 0.0)
        exc.counted = True


def count_failure(exc: BaseException, door: str) -> None:
    """Count an inference request that failed on a defect (an exception that is not a refusal) as "error" in
    ``cnnserve_requests_total``, under the model label "", unless ``DataPlane.infer`` counted it already."""
    if not getattr(exc, "counted", False):
        observe_request("", door, "error", 0.0)


def _triton_stats(name: str, version: int, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name, "version": str(version), "last_inference": stats["last_inference_ms"],
        "inference_count": stats["inference_count"], "execution_count": stats["execution_count"],
        "inference_stats": {"success": stats["success"], "fail": stats["fail"], "queue": stats["queue"],
                            "compute_input": stats["compute_input"], "compute_infer": stats["compute_infer"],
                            "compute_output": stats["compute_output"], "cache_hit": NO_DURATION,
                            "cache_miss": NO_DURATION},
        "batch_stats": [{"batch_size": size, **phases} for size, phases in
                        sorted((int(size), phases) for size, phases in stats["batch_stats"].items())],
    }


def label_predictions(card: ModelCard, probs: np.ndarray, top_k: int = 1) -> list[dict[str, Any]]:
    """Per image: the predicted label(s) and the ``top_k`` most probable labels with probabilities."""
    k = max(1, min(top_k, len(card.labels)))
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        top = [{"label": card.labels[i], "index": int(i), "prob": float(row[i])} for i in order]
        if card.multi_label:
            predicted = [card.labels[i] for i in np.flatnonzero(row > 0.5)]
        else:
            predicted = card.labels[int(np.argmax(row))]
        results.append({"label": predicted, "top_k": top})
    return results
