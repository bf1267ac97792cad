"""Open Inference Protocol REST under ``/v2`` (a Starlette app mounted into the BentoML service).

JSON tensors and the binary tensor extension (``Inference-Header-Content-Length``,
``parameters.binary_data_size`` / ``binary_data``), plus Triton's ``/config`` (so perf_analyzer works),
statistics (``/stats``) and model repository (``/v2/repository/...``) extensions.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.asgi import RequestTimeout, decoded_body, receive_body
from serving.dataplane import DataPlane, check_image_count, count_failure, count_refusal
from serving.errors import (
    INTERNAL_ERROR,
    InvalidInput,
    Overloaded,
    ServingError,
    UnsupportedMediaType,
    http_error,
    http_error_answer,
    log_refusal,
)
from serving.metrics import observe_request
from serving.model_card import PROBS_NAME
from serving.oip import OutputTensor, check_outputs, decode_input, output_tensor, timeout_deadline
from serving.probe_process import readiness_answer
from serving.tensors import reject_booleans
from serving.uvicorn_hooks import ADMITTED

log = logging.getLogger("cnnserve.oip")
TOO_DEEP = "the JSON is nested too deeply"
HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # as an answer's header name
JSON_TYPE = b"application/json"
Headers = list[tuple[bytes, bytes]]  # an ASGI message's headers
# not inference requests (images go to /classify); any other type is read as JSON or the binary extension, as
# Triton does: curl -d sends application/x-www-form-urlencoded, fetch() with a string body text/plain
REFUSED_TYPES = ("multipart/", "image/")
# the list of input tensors, then the first "shape" key in it, followed by a list: numbers in "data" cannot look
# like this, so it is the declared shape (request and output parameters may come first and have a "shape" too)
INPUTS_KEY = re.compile(rb'"inputs"\s*:\s*\[')
# headers at most this long are parsed before their image count is checked (the parse costs under a millisecond),
# so that the pattern's rare misreadings (a tensor parameter called "shape" before the tensor's own) refuse nothing
PRESCAN_BYTES = 1 << 16
SHAPE_PATTERN = re.compile(rb'"shape"\s*:\s*\[\s*(\d{1,20})(?!\d)')  # longer: no batch, parsed and refused
# integers longer than this are refused by the standard library's parser behind orjson (orjson reads integers
# past 64 bits as floats, up to 309 digits, and refuses longer ones): neither int() nor str() takes one over
# 4,300 digits (an outside probe's 5,000-digit shape was a 500)
MAX_JSON_INT_DIGITS = 20
BYTE_COUNT = re.compile(r"[0-9]{1,18}", re.ASCII)
# a JSON true / false literal as an array element, after "[" or "," (a parameter's follows a ":")
BOOLEAN_ELEMENT = re.compile(rb"[\[,]\s*$")
INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


def error_response(exc: ServingError, door: str = "oip-rest") -> JSONResponse:
    """The JSON error answer every HTTP route gives (see ``serving.errors``)."""
    log_refusal(exc, door)
    status, body, headers = http_error(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(get_dataplane: Callable[[], DataPlane]) -> Starlette:
    """``get_dataplane`` returns the worker's ``DataPlane`` (created when the service starts)."""

    def handler(fn: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request, get_dataplane())
            except ServingError as exc:
                return error_response(exc)
        return endpoint

    def model_args(request: Request) -> tuple[str, str | None]:
        return request.path_params["model"], request.path_params.get("version")

    async def server_meta(request: Request, dp: DataPlane) -> Response:
        return JSONResponse(dp.server_metadata())

    async def live(request: Request, dp: DataPlane) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request, dp: DataPlane) -> Response:
        status, body = readiness_answer(dp.readiness())
        return JSONResponse(body, status_code=status)

    async def model_meta(request: Request, dp: DataPlane) -> Response:
        return JSONResponse(dp.model_metadata(*model_args(request)))

    async def model_ready(request: Request, dp: DataPlane) -> Response:
        model = dp.model(*model_args(request))
        return JSONResponse({"name": model.name, "version": str(model.version), "ready": True})

    async def config(request: Request, dp: DataPlane) -> Response:
        return JSONResponse(dp.model_config(*model_args(request)))

    async def stats(request: Request, dp: DataPlane) -> Response:
        return JSONResponse(dp.statistics(request.path_params.get("model"), request.path_params.get("version")))

    async def repository_index(request: Request, dp: DataPlane) -> Response:
        ready = (await optional_json(request)).get("ready", False)
        if not isinstance(ready, bool):  # "yes" listed every model as a ready-only index
            raise InvalidInput(f"'ready' must be true or false, got {json.dumps(ready)[:80]}")
        return JSONResponse(dp.repository_index(ready_only=ready))

    async def load(request: Request, dp: DataPlane) -> Response:
        if (await optional_json(request)).get("parameters"):
            raise InvalidInput("load takes no parameters here: the repository's files are the configuration")
        await dp.load(request.path_params["model"])
        return JSONResponse({})

    async def unload(request: Request, dp: DataPlane) -> Response:
        parameters = (await optional_json(request)).get("parameters") or {}  # a body that is not JSON: refused
        if not isinstance(parameters, dict) or set(parameters) - {"unload_dependents"} or \
                not isinstance(parameters.get("unload_dependents", False), bool):
            raise InvalidInput("unload takes one parameter, unload_dependents (true or false; a model here has "
                               "no dependents)")
        await dp.unload(request.path_params["model"])
        return JSONResponse({})

    infer_endpoint = InferEndpoint(get_dataplane)
    prefixes = ["/models/{model}", "/models/{model}/versions/{version}"]
    routes = [Route("/", handler(server_meta)),
              Route("/health/live", handler(live)), Route("/health/ready", handler(ready)),
              Route("/models/stats", handler(stats)),
              *(Route(f"{p}/stats", handler(stats)) for p in prefixes),
              Route("/repository/index", handler(repository_index), methods=["POST"]),
              Route("/repository/models/{model}/load", handler(load), methods=["POST"]),
              Route("/repository/models/{model}/unload", handler(unload), methods=["POST"])]
    for p in prefixes:
        routes += [Route(p, handler(model_meta)), Route(f"{p}/ready", handler(model_ready)),
                   Route(f"{p}/config", handler(config)), Route(f"{p}/infer", infer_endpoint, methods=["POST"])]
    app = Starlette(routes=routes)
    app.state.infer_endpoint = infer_endpoint  # for InferFastLane
    return app


class InferEndpoint:
    """``POST /v2/models/{model}[/versions/{version}]/infer`` as a plain ASGI app (the path parameters in the scope,
    as Starlette's router or ``infer_lane`` puts them): headers, body and answer handled here, without Starlette's
    request and response objects and their layers of coroutines, which cost the door's hot path about a fifth of
    its Python time per request (serving/README.md). A client gone while its body came is answered nothing."""

    def __init__(self, get_dataplane: Callable[[], DataPlane]) -> None:
        self.get_dataplane = get_dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        dp = self.get_dataplane()
        max_images = dp.settings.max_images_per_request
        try:
            named = scope["path_params"]["model"], scope["path_params"].get("version")
            dp.model(*named)  # an unknown model is refused before its body is read
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}  # first wins
            body = await receive_body(receive, headers.get("content-length"), dp.settings.max_request_bytes)
            if body is None:
                return
            model = dp.model(*named)  # looked up again: a version may have gone while the body came
            body = decoded_body(headers.get("content-encoding"), body, dp.settings.max_request_bytes)
            images, answer = parse_body(model, headers, body, max_images)
            probs = await dp.infer(model, images, "oip-rest", answer.deadline, scope.get(ADMITTED, False))
            content_type, content, extra = infer_answer(model, answer, output_tensor(probs, answer.classes,
                                                                                     model.card.labels))
            status = 200
            headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(content)), *extra]
        except ServingError as exc:
            log_refusal(exc, "oip-rest")
            count_refusal(exc, "oip-rest")
            status, headers, content = http_error_answer(exc)
        except Exception as exc:  # a defect: logged, counted, and answered in JSON as every HTTP error is
            log.exception("an OIP REST infer request failed")
            count_failure(exc, "oip-rest")
            status, content = 500, json.dumps({"error": INTERNAL_ERROR}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


class InferFastLane:
    """ASGI middleware: ``POST /v2/models/{model}[/versions/{version}]/infer`` goes straight to the OIP app's
    infer endpoint, past the routers of BentoML's app and of the mounted OIP app and their exception
    middlewares, which cost a lone client's request about 50 µs (benchmarks/results/profile_*.md). The
    endpoint is the one the OIP app routes to; the middlewares outside this one (concurrency limit, request
    timeout, body limit, metrics) still apply. Requests admitted on their headers take ``infer_lane`` instead."""

    def __init__(self, app: ASGIApp, endpoint: ASGIApp) -> None:
        self.app, self.endpoint = app, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (match := INFER_PATH.fullmatch(scope["path"])):
            await self.endpoint(_with_path_params(scope, match), receive, send)
            return
        await self.app(scope, receive, send)


def infer_lane(endpoint: ASGIApp, timeout_s: float) -> Callable[[bytes], ASGIApp | None]:
    """For ``serving.uvicorn_hooks.install_load_shedding``: the app that runs an OIP infer request admitted on its
    headers, given its request target (None for other targets): the infer endpoint under ``RequestTimeout`` alone,
    past BentoML's whole middleware stack (proxy headers, error pages, tracing, its traffic metrics, concurrency
    limit and timeout, our body limit and error shaping), which took 15-20 % of the HTTP door's throughput at 16-64
    clients (serving/README.md). What that stack did for these requests is done here or by the endpoint: the
    concurrency limit on the headers, the 504 by ``RequestTimeout``, the body limit by ``receive_body``, errors as
    JSON by the endpoint; BentoML's own request metrics do not count them (``cnnserve_requests_total`` and its
    latency histograms do)."""

    async def infer(scope: Scope, receive: Receive, send: Send) -> None:
        await endpoint(_with_path_params(scope, INFER_PATH.fullmatch(scope["path"])), receive, send)

    app = RequestTimeout(infer, timeout_s)

    def route(target: bytes) -> ASGIApp | None:
        return app if infer_target(target) is not None else None

    return route


@functools.lru_cache(maxsize=1024)
def infer_target(target: bytes) -> tuple[str, str | None] | None:
    """(model, version or None) that an OIP infer request's target (path and query, as sent) names, or None for
    another target. Both header-time steps ask it for every request (``check_admission``, ``infer_lane``), and a
    client sends the same target again and again: parsed once per distinct target."""
    match = INFER_PATH.fullmatch(unquote(target.split(b"?", 1)[0].decode("latin-1")))
    return None if match is None else (match["model"], match["version"])


def _with_path_params(scope: Scope, match: re.Match[str]) -> Scope:
    params = {key: value for key, value in match.groupdict().items() if value is not None}
    return {**scope, "path_params": params}


def check_admission(dp: DataPlane, target: bytes) -> None:
    """Raise ``Overloaded`` when the OIP infer request to ``target`` (a request line's path and query) would be
    refused by its model's queue bound or budget (``DynamicBatcher.check_admission``, for one image), before its
    body is read: under overload most requests are refused, and a refusal that first parsed the request cost the
    worker almost what an answer costs. Anything else passes and is answered by its route as usual (another
    path, a model that is not served, a larger batch that the full check refuses later)."""
    named = infer_target(target)
    if named is None:
        return
    try:
        model = dp.model(*named)
    except ServingError:
        return
    try:
        model.batcher.check_admission()
    except Overloaded as exc:
        observe_request(model.name, "oip-rest", exc.outcome, 0.0)
        exc.counted = True
        raise


async def read_body(request: Request, limit: int) -> bytes:
    """``request``'s body (``receive_body``); a client gone before it was all in raises ``ClientDisconnect``."""
    body = await receive_body(request.receive, request.headers.get("content-length"), limit)
    if body is None:
        raise ClientDisconnect()
    return body


async def optional_json(request: Request) -> dict[str, Any]:
    """A small optional JSON object body (repository requests); ``{}`` when there is none."""
    body = await read_body(request, 64 * 1024)
    return json_object(body, "body") if body.strip() else {}


def parse_body(model: Any, headers: dict[str, str], body: bytes,
               max_images: int) -> tuple[np.ndarray, AnswerForm]:
    """``split_body``, then ``parse_infer_request``. JSON that orjson reads (up to 1,023 levels) may still be nested
    deeper than Python walks or prints (1,000 frames): the client's error, not a defect."""
    try:
        header, binary = split_body(headers, body, max_images)
        return parse_infer_request(model, header, binary, max_images)
    except RecursionError:
        raise InvalidInput(TOO_DEEP) from None


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` parsed as a JSON object, or ``InvalidInput`` saying what was wrong with ``what``.

    orjson reads it, in a quarter to two fifths of the standard library's time (one 28×28 image: 47 → 11 µs;
    1,000 images: 52 → 20 ms, a stall of the worker's event loop); what orjson refuses goes to the standard
    library, which reads a few things more (NaN, a lone surrogate in an id, a byte-order mark) and words the
    error for the client as this service always did."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(data, parse_int=_bounded_int)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"malformed JSON {what}: {exc}") from None
        except RecursionError:  # past orjson's depth limit (1,024) and the interpreter's
            raise InvalidInput(f"malformed JSON {what}: {TOO_DEEP}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"the {what} must be a JSON object")
    return value


def _bounded_int(text: str) -> int:
    """A JSON integer for the standard library's parser, refused past ``MAX_JSON_INT_DIGITS`` digits."""
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise InvalidInput(f"a JSON integer of {len(text.lstrip('-'))} digits: at most {MAX_JSON_INT_DIGITS} "
                           "are read")
    return int(text)


HINT_SCAN_BYTES = 1 << 20  # how much of a body that is not JSON is read for a JSON header before binary data
def split_body(headers: dict[str, str], body: bytes, max_images: int) -> tuple[dict[str, Any], bytes]:
    """(JSON header, binary tail) of an infer request (``headers``: its headers, names in lower case); a JSON
    header over ``PRESCAN_BYTES`` whose declared batch is over ``max_images`` is refused before it is parsed (see
    ``declared_batch``)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith(REFUSED_TYPES):
        raise UnsupportedMediaType(f"content type {content_type!r} is not an inference request: send a JSON body "
                                   f"(application/json), or binary tensor data with the {HEADER_LENGTH} header; "
                                   "image files go to /classify")
    length_text = headers.get(HEADER_LENGTH.lower())
    if length_text is None:
        header_bytes, binary = body, b""
    else:
        if not BYTE_COUNT.fullmatch(length_text) or not 0 < int(length_text) <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer between 1 and the body size {len(body)}, "
                               f"got {length_text!r}")
        n = int(length_text)
        header_bytes, binary = body[:n], body[n:]
    declared = declared_batch(header_bytes) if len(header_bytes) > PRESCAN_BYTES else None
    if declared is not None and declared > max_images:
        check_image_count(declared, max_images)
    try:
        header = json_object(header_bytes, "inference header")
    except InvalidInput as exc:
        if (json_end := json_header_length(body)) is not None:  # a wrong length: too short, the whole body, none
            given = "it is missing" if length_text is None else f"it says {length_text}"
            raise InvalidInput(f"the body is a JSON header of {json_end} bytes followed by "
                               f"{len(body) - json_end} more: with binary tensor data, the {HEADER_LENGTH} "
                               f"header must give the JSON header's length, {json_end} ({given})") from None
        if length_text is None and content_type == "application/octet-stream":
            raise InvalidInput(f"{exc.message}; binary tensor data needs the {HEADER_LENGTH} header (the length "
                               "of the JSON header before it)") from None
        raise
    if may_hold_boolean_elements(header_bytes):
        for tensor in header.get("inputs") or []:
            if isinstance(tensor, dict):
                reject_booleans(tensor.get("data"), f"input {tensor.get('name')!r}")
    return header, binary


def json_header_length(data: bytes) -> int | None:
    """The length in bytes of the JSON object that ``data`` starts with, when more bytes follow it (binary tensor
    data sent without, or with the wrong, ``Inference-Header-Content-Length``); None otherwise, or when the object
    does not end within the first ``HINT_SCAN_BYTES`` (only those are decoded)."""
    try:
        text = data[:HINT_SCAN_BYTES].decode("utf-8", errors="surrogateescape")
        value, end = json.JSONDecoder(parse_int=_bounded_int).raw_decode(text)
    except (ValueError, InvalidInput, RecursionError):  # not JSON, or an integer too long to read
        return None
    length = len(text[:end].encode("utf-8", errors="surrogateescape"))
    return length if isinstance(value, dict) and length < len(data) else None


def declared_batch(header: bytes) -> int | None:
    """The first dimension of the first ``"shape"`` among a JSON inference header's inputs, read without parsing the
    header (whose ``data`` may hold megabytes of numbers); None when there is none to read."""
    inputs = INPUTS_KEY.search(header)
    match = SHAPE_PATTERN.search(header, inputs.end()) if inputs else None
    return int(match.group(1)) if match else None


def may_hold_boolean_elements(text: bytes) -> bool:
    """Whether JSON ``text`` may have a true / false as an array element (``reject_booleans`` then looks): found
    from the literals' few places, not by reading every number. Booleans as values of keys (parameters) do not
    count; a literal behind 64 bytes of white space, or inside a string, may give a false alarm, never a miss."""
    for literal in (b"true", b"false"):
        at = text.find(literal)
        while at != -1:
            before = text[max(0, at - 64):at]
            if BOOLEAN_ELEMENT.search(before) or not before.strip():
                return True
            at = text.find(literal, at + len(literal))
    return False


def parameters(item: dict[str, Any], what: str) -> dict[str, Any]:
    """``item["parameters"]`` (of the request, a tensor or an output): a JSON object, or {} when absent."""
    params = item.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"'parameters' of {what} must be a JSON object, got {json.dumps(params)[:80]}")
    return params


@dataclass(frozen=True)
class AnswerForm:
    """How a request wants its answer: binary or JSON output, its classification count (0: probabilities), its id,
    by when (``parameters.timeout`` as a ``time.monotonic()`` deadline, or None)."""

    binary: bool
    classes: int
    request_id: str | None
    deadline: float | None


def parse_infer_request(model: Any, header: dict[str, Any], binary: bytes,
                        max_images: int) -> tuple[np.ndarray, AnswerForm]:
    """-> (images, the answer's form)."""
    named, version = header.get("model_name"), header.get("model_version")
    if named not in (None, "", model.name):  # the URL picks the model: a body naming another is a client's mix-up
        raise InvalidInput(f"the body names model {named!r}, the URL {model.name!r}: the URL picks the model")
    if version not in (None, "") and str(version) != str(model.version):
        raise InvalidInput(f"the body names version {version!r}, the URL's model is version {model.version}: put "
                           f"the version in the URL (/v2/models/{model.name}/versions/{version}/infer)")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput("'inputs' must be a list with exactly one tensor, 'images'")
    tensor = inputs[0]
    params = parameters(tensor, "input 'images'")
    raw = None
    if "binary_data_size" in params and tensor.get("data") is not None:  # "data": null is no data (kserve's client)
        raise InvalidInput("input 'images' has both 'data' and parameters.binary_data_size: send one")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input 'images': parameters.binary_data_size must be a number of bytes (an integer "
                               f">= 0), got {json.dumps(size)[:80]}")
        if size != len(binary):
            raise InvalidInput(f"binary_data_size {size} does not match the {len(binary)} bytes after the header")
        raw = binary
    elif binary:
        raise InvalidInput("binary data after the header but no input declares parameters.binary_data_size")
    images = decode_input(model, tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), max_images, raw,
                          tensor.get("data"))
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    output_parameters = [parameters(o, f"output {o.get('name')!r}") for o in outputs]
    classes = check_outputs([(o.get("name"), p.get("classification")) for o, p in zip(outputs, output_parameters,
                                                                                      strict=True)])
    request_parameters = parameters(header, "the request")
    binary_out = flag(request_parameters, "binary_data_output", "the request")
    for o, p in zip(outputs, output_parameters, strict=True):  # an output's own binary_data wins over the request's
        if "binary_data" in p:
            binary_out = flag(p, "binary_data", f"output {o.get('name')!r}")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"the request 'id' must be a string, got {json.dumps(request_id)[:40]}")
    return images, AnswerForm(binary_out, classes, request_id, timeout_deadline(request_parameters.get("timeout")))


def flag(params: dict[str, Any], name: str, where: str) -> bool:
    """The boolean parameter ``name`` of ``params`` (False when absent); a string such as "false" is an error, not
    true."""
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {name} of {where} must be a boolean (true or false), "
                           f"got {json.dumps(value)[:40]}")
    return value


def infer_answer(model: Any, answer: AnswerForm, output: OutputTensor) -> tuple[bytes, bytes, Headers]:
    """(content type, body, headers beyond type and length) of an infer request's answer: JSON, or the binary
    tensor extension's JSON header then raw bytes (with ``Inference-Header-Content-Length``)."""
    tensor: dict[str, Any] = {"name": PROBS_NAME, "datatype": output.datatype, "shape": output.shape}
    result: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version), "outputs": [tensor]}
    if answer.request_id is not None:
        result["id"] = answer.request_id
    if not answer.binary:
        tensor["data"] = output.json_data()
        return JSON_TYPE, json_bytes(result), []
    raw = output.raw()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json_bytes(result)
    return b"application/octet-stream", header + raw, [(HEADER_LENGTH_KEY, b"%d" % len(header))]


def json_bytes(value: Any) -> bytes:
    """``value`` as compact JSON, as Starlette's ``JSONResponse`` renders it (no NaN: a ValueError). A string with a
    lone surrogate (a legal JSON escape, e.g. in a request's ``id``, which the answer echoes) cannot be UTF-8: such a
    value is written with ASCII escapes instead, so that the client gets back the ``\\udXXX`` it sent."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
