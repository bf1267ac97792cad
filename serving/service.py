"""The BentoML service: ``bentoml serve serving.service:CnnServe``.

HTTP (port 3000): ``POST /classify`` (image uploads), ``POST /predict`` (JSON arrays), ``GET /models``
(the cards), Open Inference Protocol REST under ``/v2``, and BentoML's ``/livez``, ``/readyz``,
``/metrics`` and docs UI at ``/``. gRPC (``CNNSERVE_GRPC_PORT``, 8001): the OIP gRPC service and
``grpc.health.v1``. Each worker holds its own model repository and batchers; all doors share them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.asgi import BodyLimit, MountRoots, RequestTimeout
from serving.errors import InvalidInput, ServingError
from serving.images import decode_upload
from serving.inference import Inference, label_predictions, numbers_to_uint8
from serving.oip_grpc import GrpcServer
from serving.oip_rest import create_app
from serving.repository import LoadedModel, ModelRepository
from serving.settings import Settings

log = logging.getLogger("cnnserve")
SETTINGS = Settings.from_env()
INFERENCE_PATHS = ["/v2", "/classify", "/predict"]


def tracing_config(settings: Settings) -> dict:
    """BentoML's OpenTelemetry middleware costs about half the HTTP throughput (measured in
    serving/README.md): the inference paths skip it unless ``CNNSERVE_TRACE_REQUESTS`` is on."""
    return {} if settings.trace_requests else {"excluded_urls": INFERENCE_PATHS}


def use_request_timeout() -> bool:
    """Make BentoML's HTTP app enforce ``traffic.timeout`` with ``RequestTimeout``, whose timers end with
    their requests (BentoML's outlive them: see ``RequestTimeout``). False where this BentoML has no such
    middleware to swap; its own then stays."""
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:
        return False
    if not hasattr(traffic, "TimeoutMiddleware"):
        return False
    traffic.TimeoutMiddleware = RequestTimeout  # base_app.middlewares looks it up when it builds the app
    return True


if not use_request_timeout():
    log.warning("BentoML's TimeoutMiddleware was not found: HTTP requests keep BentoML's own timeout handling")


class RequestError(BentoMLException):
    """A ``ServingError`` in BentoML's clothes: its HTTP status and message reach the client."""

    def __init__(self, exc: ServingError) -> None:
        from http import HTTPStatus

        super().__init__(exc.message, error_code=HTTPStatus(exc.http_status))


_instance: CnnServe | None = None  # this worker's service instance, for the mounted ASGI apps


def current_inference() -> Inference:
    if _instance is None:
        raise RuntimeError("the service is not initialised yet")
    return _instance.inference


async def list_models(request: Request) -> JSONResponse:
    repo = current_inference().repository
    name = request.path_params.get("name")
    cards = [m.card.to_dict() | {"providers": m.providers, "device_note": m.device_note}
             for m in repo.all_loaded() if name in (None, m.name)]
    status = [s.__dict__ for s in repo.statuses() if name in (None, s.name)]
    if name is not None and not status:
        return JSONResponse({"error": f"model {name!r} not found"}, status_code=404)
    return JSONResponse({"models": cards, "status": status})


models_app = Starlette(routes=[Route("/", list_models), Route("/{name}", list_models)])
oip_app = create_app(current_inference)


@bentoml.asgi_app(oip_app, path="/v2")
@bentoml.asgi_app(models_app, path="/models")
@bentoml.service(name="cnnserve", workers=SETTINGS.worker_count, logging={"access": {"enabled": False}},
                 traffic={"timeout": 60}, tracing=tracing_config(SETTINGS))
class CnnServe:
    """Classify images with the models in the repository (``CNNSERVE_MODEL_DIR``)."""

    def __init__(self) -> None:
        global _instance
        self.settings = SETTINGS
        self.repository = ModelRepository(SETTINGS)
        for change in self.repository.scan():
            log.info("model repository %s: %s", SETTINGS.model_dir, change)
        self.inference = Inference(self.repository, SETTINGS)
        self.grpc: GrpcServer | None = None
        self._poller: asyncio.Task[None] | None = None
        _instance = self

    @bentoml.on_startup
    async def start_background(self) -> None:
        if self.settings.grpc_port:
            self.grpc = GrpcServer(self.inference, self.settings.grpc_host, self.settings.grpc_port,
                                   self.settings.max_request_bytes)
            await self.grpc.start()
        if self.settings.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_repository())
        # What exists now (modules, BentoML, the models) lives as long as the worker: keep it out of the
        # garbage collector's full passes, which otherwise walk it all and stop the event loop for ~70 ms
        # about once a second under load (serving/README.md, "HTTP tail")
        gc.collect()
        gc.freeze()

    async def _poll_repository(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                changes = await asyncio.to_thread(self.repository.scan)
            except Exception:
                log.exception("model repository scan failed")
                continue
            for change in changes:
                log.info("model repository: %s", change)
            if changes and self.grpc:
                await self.grpc.set_serving(self.repository.ready)

    @bentoml.on_shutdown
    async def stop_background(self) -> None:
        if self._poller:
            self._poller.cancel()
        if self.grpc:
            await self.grpc.stop()
        self.repository.close()

    def __is_ready__(self) -> bool:
        return self.repository.ready

    def _model(self, name: str, version: str) -> LoadedModel:
        if not name:
            loaded = self.repository.latest()
            if len(loaded) != 1:
                names = ", ".join(m.name for m in loaded) or "none loaded"
                raise InvalidInput(f"'model' is required: one of {names}")
            return loaded[0]
        return self.repository.get(name, version or None)

    @bentoml.api(route="/classify")
    async def classify(self, images: list[Path], model: str = "", version: str = "", top_k: int = 1) -> dict:
        """Classify uploaded images (PNG, JPEG, BMP, TIFF; .npy for 3D volumes), converted to the model's input."""
        try:
            loaded = self._model(model, version)
            if not images:
                raise InvalidInput("no images uploaded: send one or more files in the 'images' field")
            decoded = [decode_upload(p.read_bytes(), loaded.card, self.settings.max_image_pixels, p.name)
                       for p in images]
            batch = np.stack([image for image, _ in decoded])
            probs = await self.inference.probs(loaded, batch, "classify")
        except ServingError as exc:
            raise RequestError(exc) from None
        results = label_predictions(loaded.card, probs, top_k)
        for index, (result, (_, notes)) in enumerate(zip(results, decoded, strict=True)):
            result.update(index=index, converted=notes)
        return {"model": loaded.name, "version": loaded.version, "results": results}

    @bentoml.api(route="/predict")
    async def predict(self, instances: list, model: str = "", version: str = "", top_k: int = 1) -> dict:
        """Classify uint8 pixel arrays given as JSON (one image, or a list of images, in the model's layout)."""
        try:
            loaded = self._model(model, version)
            array = numbers_to_uint8(instances, "instances")
            if array.ndim == len(loaded.card.input.shape):
                array = array[None]
            probs = await self.inference.probs(loaded, array, "predict")
        except ServingError as exc:
            raise RequestError(exc) from None
        return {"model": loaded.name, "version": loaded.version,
                "predictions": [dict(p, probs=row.tolist()) for p, row in
                                zip(label_predictions(loaded.card, probs, top_k), probs, strict=True)]}


CnnServe.add_asgi_middleware(BodyLimit, limit=SETTINGS.max_request_bytes)
CnnServe.add_asgi_middleware(MountRoots, paths=("/v2", "/models"))
