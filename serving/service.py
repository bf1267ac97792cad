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
import math
import re
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml import get_current_service  # once: each bentoml.<name> goes through its lazy __getattr__
from pydantic import BeforeValidator, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.asgi import (
    BodyLimit,
    FormBodies,
    JsonBodies,
    JsonErrors,
    MountRoots,
    install_multipart_field_check,
    install_request_timeout,
    install_route_labels,
    quiet_client_errors,
)
from serving.connections import ConnectionShare
from serving.dataplane import DataPlane, check_image_count, count_refusal, label_predictions
from serving.errors import InvalidInput, ServingError
from serving.health import HealthServer
from serving.images import check_request_pixels, decode_upload
from serving.listeners import accept_queue, listening_sockets, stop_listening
from serving.model_card import ModelCard
from serving.oip_grpc import GrpcServer
from serving.oip_rest import InferFastLane, check_admission, create_app, error_response, infer_lane
from serving.probe_process import LIVE_PATHS, READY_PATHS, readiness_answer
from serving.repository import ModelRepository, ScanResult
from serving.settings import Settings
from serving.tensors import numbers_to_uint8, reject_booleans
from serving.uvicorn_hooks import (
    InFlight,
    install_batch_accept,
    install_connection_balance,
    install_lazy_keep_alive,
    install_load_shedding,
    install_probe_answers,
    install_read_limits,
    install_refusals_at_once,
    install_single_write_responses,
    install_upgrades_ignored,
)
from serving.worker_stats import PUBLISH_INTERVAL_S, SharedStats

log = logging.getLogger("cnnserve")
SETTINGS = Settings.from_env()
log.setLevel(SETTINGS.log_level.upper())  # the root logger's WARNING hid every INFO line of the service
INFERENCE_PATHS = ["/v2", "/classify", "/predict"]
TEMP_UPLOAD = re.compile(r"tmp[a-z0-9_]{8}(.*)", re.DOTALL)


def tracing_config(settings: Settings) -> dict:
    """BentoML's OpenTelemetry middleware costs about half the HTTP throughput (measured in
    serving/README.md): the inference paths skip it unless ``CNNSERVE_TRACE_REQUESTS`` is on."""
    return {} if settings.trace_requests else {"excluded_urls": INFERENCE_PATHS}


def traffic_config(settings: Settings) -> dict:
    """BentoML's traffic options: the request timeout, and the HTTP concurrency limit over all workers
    (BentoML divides it between them and answers 429 past it; health and metrics paths are exempt)."""
    config: dict = {"timeout": settings.request_timeout_s}
    if settings.max_concurrency > 0:
        config["max_concurrency"] = settings.max_concurrency * settings.worker_count
    return config


if not install_upgrades_ignored():
    log.warning("uvicorn's httptools protocol was not found: a request offering Upgrade loses its body")
if not install_refusals_at_once():  # first: it stands in for uvicorn's own method, under the other wrappers
    log.warning("uvicorn's httptools protocol was not found, or was wrapped already: refusals go through its cycle")
if (SETTINGS.header_timeout_s > 0 or SETTINGS.max_header_bytes > 0) and \
        not install_read_limits(SETTINGS.header_timeout_s, SETTINGS.max_header_bytes):
    log.warning("uvicorn's httptools protocol was not found: no header or body read limits (install the serve extra)")
if not install_request_timeout():
    log.warning("BentoML's TimeoutMiddleware was not found: HTTP requests keep BentoML's own timeout handling")
if not install_route_labels():
    log.warning("BentoML's metrics middleware was not found: its request metrics are labelled by raw path")
if not install_multipart_field_check(SETTINGS.max_images_per_request):
    log.warning("BentoML's multipart parser was not found: a file in a value field is not refused up front")
if not install_single_write_responses():
    log.warning("uvicorn's httptools protocol was not found: HTTP responses are written in two sends")
if not install_lazy_keep_alive():
    log.warning("uvicorn's httptools protocol was not found: its keep-alive timer is armed and cancelled per request")


def _not_boolean(value: Any) -> Any:
    """Refuse true / false where a number or a name is meant (pydantic's lax mode reads true as 1: version true
    served version 1)."""
    if isinstance(value, bool):
        raise ValueError("true / false is not a version or a count")
    return value


TopK = Annotated[int, BeforeValidator(_not_boolean),
                 Field(ge=1, description="how many of the most probable labels to list per image")]
Version = Annotated[str | int, BeforeValidator(_not_boolean),
                    Field(description="the model version (a number); empty: the latest")]
UNLOAD_FOLLOW_S = 0.1  # how often a worker's poller looks whether another worker unloaded or loaded a model
ACCEPT_QUEUE_WAIT_S = 0.1  # at shutdown, the longest wait for the listener's accept queue to be empty
LAST_REQUESTS_S = 0.2  # at shutdown, from the listener's stop to uvicorn's: the last connections' requests come in


def current_dataplane() -> DataPlane:
    """This worker's dataplane, for the mounted ASGI apps."""
    return get_current_service().dataplane


async def model_cards(request: Request) -> Response:
    try:
        return JSONResponse(current_dataplane().model_cards(request.path_params.get("name")))
    except ServingError as exc:
        return error_response(exc, "models")


models_app = Starlette(routes=[Route("/", model_cards), Route("/{name}", model_cards)])
oip_app = create_app(current_dataplane)


@bentoml.asgi_app(oip_app, path="/v2")
@bentoml.asgi_app(models_app, path="/models")
@bentoml.service(name="cnnserve", workers=SETTINGS.worker_count, logging={"access": {"enabled": False}},
                 traffic=traffic_config(SETTINGS), tracing=tracing_config(SETTINGS))
class CnnServe:
    """Classify images with the models in the repository (``CNNSERVE_MODEL_DIR``)."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        slot = (bentoml.server_context.worker_index or 1) - 1
        self.repository = ModelRepository(SETTINGS, worker_slot=slot)
        self.health: HealthServer | None = None  # the probe port, started with the other doors
        if SETTINGS.health_port:  # before the models load: see HealthServer
            self.health = HealthServer(SETTINGS.health_host, SETTINGS.health_port, lambda: self.dataplane.readiness(),
                                       self.repository.shared_dir, SETTINGS.worker_count, slot,
                                       SETTINGS.liveness_stall_s)
        for change in self.repository.scan().changes:
            log.info("model repository %s: %s", SETTINGS.model_dir, change)
        self.dataplane = DataPlane(self.repository, SETTINGS, SharedStats(self.repository.shared_dir, slot))
        self.dataplane.on_scan = self.apply
        self._draining_flag = self.repository.shared_dir / f"draining-{slot}"  # this worker got SIGTERM
        self._draining_flag.unlink(missing_ok=True)  # a respawned worker's predecessor may have left it
        self.connections: ConnectionShare | None = None  # HTTP connections per worker, to spread them
        if SETTINGS.worker_count > 1:
            self.connections = ConnectionShare(self.repository.shared_dir / "connections", SETTINGS.worker_count, slot)
        if not install_connection_balance(self._connection_opened, self._connection_closed, self._hand_back):
            log.warning("uvicorn's httptools protocol was not found: HTTP connections are not spread over workers "
                        "nor closed while draining")
            self.connections = None
        if not install_batch_accept():
            log.warning("uvicorn's httptools protocol was not found: new HTTP connections are accepted one per turn "
                        "of the event loop")
        if not install_probe_answers(self._probe_answer):
            log.warning("uvicorn's httptools protocol was not found: probes on the HTTP port queue behind inference")
        quiet_client_errors()
        self.grpc: GrpcServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stats_publisher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # drains and the shutdown sequence, running

    @bentoml.on_startup
    async def start_background(self) -> None:
        self.dataplane.loop_lag.start()
        lane = None if self.settings.trace_requests else infer_lane(oip_app.state.infer_endpoint,
                                                                     self.settings.request_timeout_s)
        if not install_load_shedding(self._refuse_early, self.settings.max_concurrency, lane):
            log.warning("uvicorn's httptools protocol was not found: HTTP requests are refused only after parsing")
        if self.health:  # first: a port that cannot be bound stops the worker before gRPC starts
            self.health.start()
        if self.settings.grpc_port:
            self.grpc = GrpcServer(self.dataplane, self.settings)
            await self.grpc.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll_repository())
        self._stats_publisher = asyncio.get_running_loop().create_task(self._publish_statistics())
        self._drain_on_sigterm()
        # What exists now (modules, BentoML, the models) lives as long as the worker: keep it out of the
        # garbage collector's full passes, which otherwise walk it all and stop the event loop for ~70 ms
        # about once a second under load (serving/README.md, "HTTP tail")
        gc.collect()
        gc.freeze()

    def _refuse_early(self, target: bytes) -> None:
        """Raise ``Overloaded`` for an HTTP inference request, as soon as its headers are in, when this worker's
        event loop is behind or the model the path names would refuse it anyway (queue bound or budget)."""
        self.dataplane.check_loop_lag("http", others=InFlight.count)
        check_admission(self.dataplane, target)

    async def _poll_repository(self) -> None:
        """Scan the repository every ``poll_interval_s`` (0: never on a timer), and at once when another worker has
        unloaded or loaded a model (checked every ``UNLOAD_FOLLOW_S``: one ``stat``), so that the workers agree
        before the load / unload call is answered (``DataPlane.load`` waits for them), not a poll interval later."""
        loop = asyncio.get_running_loop()
        interval = self.settings.poll_interval_s if self.settings.poll_interval_s > 0 else math.inf
        next_scan = loop.time() + interval
        while True:
            await asyncio.sleep(min(UNLOAD_FOLLOW_S, interval))
            if loop.time() < next_scan and not self.repository.unloaded_changed():
                continue
            next_scan = loop.time() + interval
            try:
                result = await asyncio.to_thread(self.repository.scan)
            except Exception:
                log.exception("model repository scan failed")
                continue
            await self.apply(result)

    async def _publish_statistics(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            try:
                self.dataplane.publish_statistics()
            except OSError:
                log.exception("publishing this worker's statistics failed")

    async def apply(self, result: ScanResult) -> None:
        """Log what a scan changed, drain the versions it dropped, and update readiness on the probe port and gRPC."""
        for change in result.changes:
            log.info("model repository: %s", change)
        for model in result.removed:  # on the event loop, where their queues live
            self._background(model.batcher.drain(self.settings.version_drain_s,
                                                 f"model {model.name}/{model.version} was removed from the repository"))
        if result.changes and self.health:
            self.health.publish()
        if result.changes and self.grpc:
            await self.grpc.set_serving(self.dataplane.ready())

    def _connection_opened(self, client: object) -> None:
        if self.connections:
            self.connections.opened(client)

    def _connection_closed(self, client: object) -> None:
        if self.connections:
            self.connections.closed(client)

    def _hand_back(self, client: object) -> bool:
        """Whether to end this HTTP connection after the response (``Connection: close``): every one while
        draining, so that keep-alive clients reconnect, through the Service, to pods still ready (kube-proxy and
        load balancers move new connections only, and a pooled client would otherwise stay on this pod until it
        stops); otherwise what spreading the connections over the workers asks."""
        if self.dataplane.draining:
            return True
        return self.connections.hand_back(client) if self.connections else False

    def _whole_server_draining(self) -> bool:
        """Whether every worker got SIGTERM (the server is stopping), not this one alone: the HTTP listening socket
        is shared, and a worker stopped alone is respawned and must find it listening."""
        return all((self.repository.shared_dir / f"draining-{slot}").exists()
                   for slot in range(self.settings.worker_count))

    def _drain_on_sigterm(self) -> None:
        """On SIGTERM, report not-ready first (HTTP readiness and gRPC health), keep serving for
        ``shutdown_drain_s`` while load balancers take the pod out (each HTTP response then ends its connection),
        then hand the signal to uvicorn, which stops accepting and finishes what is in flight
        (``--timeout-graceful-shutdown``)."""
        loop = asyncio.get_running_loop()
        stop = signal.getsignal(signal.SIGTERM)  # uvicorn's handler
        if not callable(stop):
            return

        async def drain_then_stop(signum: int) -> None:
            log.info("SIGTERM: not ready now, serving on for %g s before shutting down", self.settings.shutdown_drain_s)
            self.dataplane.draining = True
            if self.health:
                self.health.publish()
            if self.grpc:
                await self.grpc.set_serving(False)
            self._draining_flag.parent.mkdir(parents=True, exist_ok=True)
            self._draining_flag.touch()
            await asyncio.sleep(self.settings.shutdown_drain_s)
            if self._whole_server_draining():
                # connections completed but not accepted yet would be reset with their requests: wait for the
                # workers to accept them (the listener keeps taking new ones meanwhile, so not for ever); the last
                # check and the stop run back to back (a client reconnecting then would be reset after sending)
                # gRPC stops on its own, and the probe port answers (not ready, live) until the worker exits
                kept = {self.settings.grpc_port, self.health.port if self.health else 0}
                with listening_sockets(keep_ports=kept) as listeners:
                    give_up = loop.time() + ACCEPT_QUEUE_WAIT_S
                    while (waiting := accept_queue(listeners)) and loop.time() < give_up:
                        await asyncio.sleep(0.001)
                    stop_listening(listeners)
                if waiting:
                    log.warning("stopped listening with %d connection(s) not accepted yet: they were reset", waiting)
                # connections accepted just before carry requests not read yet: uvicorn would cut them as idle
                await asyncio.sleep(LAST_REQUESTS_S)
            stop(signum, None)

        def on_sigterm(signum: int, frame: object) -> None:
            if self.dataplane.draining:  # a second SIGTERM: stop now
                stop(signum, frame)
                return
            loop.call_soon_threadsafe(self._background, drain_then_stop(signum))

        signal.signal(signal.SIGTERM, on_sigterm)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on the event loop, keeping the task referenced until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @bentoml.on_shutdown
    async def stop_background(self) -> None:
        self.dataplane.loop_lag.stop()
        if self._poller:
            self._poller.cancel()
        if self._stats_publisher:
            self._stats_publisher.cancel()
        if self.grpc:
            await self.grpc.stop()
        if self.health:
            await self.health.stop()
        if self.connections:
            self.connections.close()
        self.repository.close()

    def __is_ready__(self) -> bool:
        return self.dataplane.ready()

    def _probe_answer(self, path: str) -> tuple[int, dict] | None:
        """The HTTP port's answer to a probe at ``path`` (``install_probe_answers``), None for another path:
        readiness as the probe port gives it, and live (the worker's loop answers)."""
        if path in READY_PATHS:
            return readiness_answer(self.dataplane.readiness())
        if path in LIVE_PATHS:
            return 200, {"live": True}
        return None

    @bentoml.api(route="/classify")
    async def classify(self, images: list[Path], model: str = "", version: Version = "", top_k: TopK = 1) -> dict:
        """Classify uploaded images (PNG, JPEG, BMP, TIFF, GIF, WebP; .npy for 3D volumes), converted to the model's
        input."""
        try:
            loaded = self.dataplane.model(model, version)
            if not images:
                raise InvalidInput("no images uploaded: send one or more files in the 'images' field")
            check_image_count(len(images), self.settings.max_images_per_request)
            # off the event loop: a large picture takes a decoder 0.2 s or more
            decoded = await asyncio.to_thread(self._decode_uploads, images, loaded.card)
            probs = await self.dataplane.infer(loaded, np.stack([image for image, _ in decoded]), "classify")
        except ServingError as exc:
            count_refusal(exc, "classify")
            return error_response(exc, "classify")
        results = label_predictions(loaded.card, probs, top_k)
        for index, (result, (_, notes)) in enumerate(zip(results, decoded, strict=True)):
            result.update(index=index, converted=notes)
        return {"model": loaded.name, "version": str(loaded.version), "results": results}

    def _decode_uploads(self, images: list[Path], card: ModelCard) -> list[tuple[np.ndarray, list[str]]]:
        """The uploads decoded for ``card``, their declared pixels checked together first."""
        uploads = [path.read_bytes() for path in images]
        check_request_pixels(uploads, self.settings.max_request_pixels)
        return [decode_upload(data, card, self.settings.max_image_pixels, upload_name(path) or f"#{i + 1} (no name)")
                for i, (data, path) in enumerate(zip(uploads, images, strict=True))]

    @bentoml.api(route="/predict")
    async def predict(self, instances: list, model: str = "", version: Version = "", top_k: TopK = 1) -> dict:
        """Classify uint8 pixel arrays given as JSON (one image, or a list of images, in the model's layout)."""
        try:
            loaded = self.dataplane.model(model, version)
            single = _depth(instances) == len(loaded.card.input.shape)
            check_image_count(1 if single else len(instances), self.settings.max_images_per_request)
            reject_booleans(instances, "instances")
            array = numbers_to_uint8(instances, "instances")
            shape = loaded.card.input.shape
            if list(array.shape[0 if single else 1:]) != shape:  # quoted as sent, before a batch axis is added
                raise InvalidInput(f"instances have shape {list(array.shape)}; model {loaded.name} takes one image "
                                   f"of shape {shape} ({loaded.card.layout} without N) or a list of them")
            if single:
                array = array[None]
            probs = await self.dataplane.infer(loaded, array, "predict")
        except ServingError as exc:
            count_refusal(exc, "predict")
            return error_response(exc, "predict")
        return {"model": loaded.name, "version": str(loaded.version),
                "predictions": [dict(p, probs=row.tolist()) for p, row in
                                zip(label_predictions(loaded.card, probs, top_k), probs, strict=True)]}


def _refuse_unknown_fields(*apis: Any) -> None:
    """A field an API does not take (a misspelt ``topk``) is refused with a 400 naming it, instead of ignored."""
    for api in apis:
        api.input_spec.model_config["extra"] = "forbid"
        api.input_spec.model_rebuild(force=True)


def _depth(values: list) -> int:
    """How deeply the first elements of nested lists nest: 2 for one greyscale image given as rows."""
    depth = 0
    while isinstance(values, list) and values:
        depth, values = depth + 1, values[0]
    return depth


def upload_name(path: Path) -> str:
    """The client's name of an uploaded file. BentoML hands the API a temporary file named by
    ``tempfile.NamedTemporaryFile(suffix=<client's file name>)``: ``tmp`` + 8 random characters + the name."""
    match = TEMP_UPLOAD.fullmatch(path.name)
    return match.group(1) if match else path.name  # "": the client gave no name (or one ending in "/")


_refuse_unknown_fields(CnnServe.apis["classify"], CnnServe.apis["predict"])
CnnServe.add_asgi_middleware(BodyLimit, limit=SETTINGS.max_request_bytes)
CnnServe.add_asgi_middleware(JsonErrors)
CnnServe.add_asgi_middleware(MountRoots, paths=("/v2", "/models"))
CnnServe.add_asgi_middleware(InferFastLane, endpoint=oip_app.state.infer_endpoint)
# inside the fast lane: /v2 infer never meets it
CnnServe.add_asgi_middleware(JsonBodies, paths=("/predict",), max_bytes=SETTINGS.max_request_bytes)
CnnServe.add_asgi_middleware(FormBodies, paths=("/classify",))
