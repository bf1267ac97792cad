"""Open Inference Protocol REST under ``/v2`` (a Starlette app mounted into the BentoML service).

JSON tensors and the binary tensor extension (``Inference-Header-Content-Length``,
``parameters.binary_data_size`` / ``binary_data``), plus Triton's ``/config`` so perf_analyzer works.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.errors import InvalidInput, PayloadTooLarge, ServingError, UnsupportedMediaType
from serving.inference import Inference
from serving.model_card import PROBS_NAME
from serving.oip import check_outputs, decode_input, model_config, model_metadata, server_metadata

HEADER_LENGTH = "Inference-Header-Content-Length"
ACCEPTED_TYPES = ("application/json", "application/octet-stream", "")


def error_response(exc: ServingError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.http_status)


def create_app(get_inference: Callable[[], Inference]) -> Starlette:
    """``get_inference`` returns the worker's ``Inference`` (created when the service starts)."""

    def handler(fn: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request, get_inference())
            except ServingError as exc:
                return error_response(exc)
        return endpoint

    async def server_meta(request: Request, inf: Inference) -> Response:
        return JSONResponse(server_metadata())

    async def live(request: Request, inf: Inference) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request, inf: Inference) -> Response:
        repo = inf.repository
        body: dict[str, Any] = {"ready": repo.ready}
        if repo.device_note:  # e.g. CNNSERVE_DEVICE=auto fell back to the CPU
            body["device_note"] = repo.device_note
        not_ready = {f"{s.name}/{s.version}": s.reason for s in repo.statuses() if not s.ready}
        if not_ready:
            body["not_ready"] = not_ready
        return JSONResponse(body, status_code=200 if repo.ready else 503)

    def lookup(request: Request, inf: Inference):
        return inf.model(request.path_params["model"], request.path_params.get("version"))

    async def model_meta(request: Request, inf: Inference) -> Response:
        model = lookup(request, inf)
        return JSONResponse(model_metadata(model, inf.repository.versions(model.name)))

    async def model_ready(request: Request, inf: Inference) -> Response:
        model = lookup(request, inf)
        return JSONResponse({"name": model.name, "version": str(model.version), "ready": True})

    async def config(request: Request, inf: Inference) -> Response:
        return JSONResponse(model_config(lookup(request, inf)))

    async def infer(request: Request, inf: Inference) -> Response:
        model = lookup(request, inf)
        body = await read_body(request, inf.settings.max_request_bytes)
        header, binary = split_body(request, body)
        images, binary_out, request_id = parse_infer_request(model, header, binary)
        probs = await inf.probs(model, images, "oip-rest")
        return infer_response(model.name, model.version, request_id, probs, binary_out)

    prefixes = ["/models/{model}", "/models/{model}/versions/{version}"]
    routes = [Route("/", handler(server_meta)),
              Route("/health/live", handler(live)), Route("/health/ready", handler(ready))]
    for p in prefixes:
        routes += [Route(p, handler(model_meta)), Route(f"{p}/ready", handler(model_ready)),
                   Route(f"{p}/config", handler(config)), Route(f"{p}/infer", handler(infer), methods=["POST"])]
    return Starlette(routes=routes)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def split_body(request: Request, body: bytes) -> tuple[dict[str, Any], bytes]:
    """(JSON header, binary tail) of an infer request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(f"content type {content_type!r} is not accepted: send application/json, or "
                                   f"application/octet-stream with the {HEADER_LENGTH} header")
    length_text = request.headers.get(HEADER_LENGTH)
    if length_text is None:
        header_bytes, binary = body, b""
    else:
        if not length_text.isdigit() or not 0 < int(length_text) <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer between 1 and the body size {len(body)}, "
                               f"got {length_text!r}")
        n = int(length_text)
        header_bytes, binary = body[:n], body[n:]
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JSON inference header: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("the inference request must be a JSON object")
    return header, binary


def parse_infer_request(model: Any, header: dict[str, Any], binary: bytes) -> tuple[np.ndarray, bool, str | None]:
    """-> (images, whether to answer with binary outputs, request id)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput("'inputs' must be a list with exactly one tensor, 'images'")
    tensor = inputs[0]
    params = tensor.get("parameters") or {}
    raw = None
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(binary):
            raise InvalidInput(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the header")
        raw = binary
    elif binary:
        raise InvalidInput("binary data after the header but no input declares parameters.binary_data_size")
    images = decode_input(model, tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), raw,
                          tensor.get("data"))
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    check_outputs([o.get("name") for o in outputs])
    binary_out = bool((header.get("parameters") or {}).get("binary_data_output")) or any(
        (o.get("parameters") or {}).get("binary_data") for o in outputs)
    request_id = header.get("id")
    return images, binary_out, request_id if isinstance(request_id, str) else None


def infer_response(name: str, version: int, request_id: str | None, probs: np.ndarray, binary: bool) -> Response:
    output: dict[str, Any] = {"name": PROBS_NAME, "datatype": "FP32", "shape": list(probs.shape)}
    result: dict[str, Any] = {"model_name": name, "model_version": str(version), "outputs": [output]}
    if request_id is not None:
        result["id"] = request_id
    if not binary:
        output["data"] = probs.ravel().tolist()
        return JSONResponse(result)
    raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(result, separators=(",", ":")).encode()
    return Response(header + raw, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))})
