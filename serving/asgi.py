"""Small ASGI middlewares around the BentoML service's HTTP app, and the one place that reaches into
BentoML's private modules (the ``install_*`` functions). The hooks into uvicorn's HTTP protocol are in
``serving.uvicorn_hooks``, the listening sockets' helpers in ``serving.listeners``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BadInput
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Mount, Route

from serving.dataplane import count_refusal
from serving.errors import (
    BodyTooLarge,
    InvalidInput,
    PayloadTooLarge,
    ServingError,
    UnsupportedMediaType,
    http_error_answer,
    log_refusal,
)

BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"  # where BentoML logs errors of its HTTP APIs


UTF8_BOM = b"\xef\xbb\xbf"


GZIP_MAGIC = b"\x1f\x8b"
CODINGS = {"gzip": 31, "deflate": 15}  # Content-Encoding -> zlib's wbits (deflate is the zlib format, RFC 9110)


def decoded_body(coding: str | None, body: bytes, limit: int) -> bytes:
    """The body before its Content-Encoding: gzip or deflate, which Triton accepts and its clients send
    (tritonclient's ``request_compression_algorithm``; ``Inference-Header-Content-Length`` counts the decoded
    body). Decoded up to ``limit`` bytes and refused past it (413), so that a small compressed body cannot expand
    without bound; a gzip body of several members is read whole, bytes after the compressed data are a 400, and
    another coding is a 415."""
    coding = (coding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in CODINGS:
        raise UnsupportedMediaType(f"Content-Encoding {coding!r} is not accepted: send gzip, deflate or none")
    decoded, rest = b"", body
    while True:  # gzip: one member after another (RFC 1952), as gzip.decompress reads them
        decoder = zlib.decompressobj(CODINGS[coding])
        try:
            decoded += decoder.decompress(rest, limit + 1 - len(decoded))
        except zlib.error as exc:
            raise InvalidInput(f"the body is not valid {coding} data: {exc}") from None
        if len(decoded) > limit:
            raise PayloadTooLarge(f"the {coding} body decodes to more than {limit} bytes "
                                  "(CNNSERVE_MAX_REQUEST_BYTES)")
        if not decoder.eof:
            raise InvalidInput(f"the {coding} body ends before its compressed stream does")
        rest = decoder.unused_data
        if not rest:
            return decoded
        if coding != "gzip" or not rest.startswith(GZIP_MAGIC):
            raise InvalidInput(f"the {coding} body has {len(rest)} bytes after the end of its compressed data")


class MountRoots:
    """Serve a mounted app's bare path (``GET /v2``, which perf_analyzer asks for) as its root (``/v2/``)
    instead of answering with a redirect."""

    def __init__(self, app: Any, paths: tuple[str, ...]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope["path"].encode() + b"/"}
        await self.app(scope, receive, send)


class _PostBodies:
    """A middleware that reads the bodies of POSTs to ``paths`` its own way (``handle``); other requests pass."""

    def __init__(self, app: Any, paths: tuple[str, ...]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send, scope.get("headers") or [])

    async def handle(self, scope: dict, receive: Any, send: Any, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError


class JsonBodies(_PostBodies):
    """The JSON routes at ``paths`` (``/predict``) read their body as JSON, as the OIP infer endpoint does: whatever
    content type came with it but a multipart form (curl ``-d`` sends ``application/x-www-form-urlencoded``, which
    BentoML parsed as a form: "instances: Field required"), after a UTF-8 byte-order mark (files saved by
    Windows tools start with one; BentoML's parser refused it as invalid JSON), and decoded from its
    Content-Encoding, gzip or deflate, up to ``max_bytes`` decoded (``decoded_body``; BentoML ignored the header: a
    gzip body was "Invalid JSON", and a plain one labelled ``br`` was answered)."""

    def __init__(self, app: Any, paths: tuple[str, ...], max_bytes: int) -> None:
        super().__init__(app, paths)
        self.max_bytes = max_bytes

    async def handle(self, scope: dict, receive: Any, send: Any, headers: list[tuple[bytes, bytes]]) -> None:
        content_type = dict(headers).get(b"content-type", b"").lower()
        if content_type.startswith(b"image/"):  # a picture sent as the body, as to an upload endpoint
            await _refuse(send, scope, UnsupportedMediaType(
                f"{scope['path']} takes JSON ({{\"instances\": [...]}}); image files go to /classify, as "
                "multipart/form-data in its 'images' field (curl -F images=@digit.png)"))
            return
        if not content_type.startswith(b"multipart/"):
            headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
        coding = dict(headers).get(b"content-encoding", b"identity").decode("latin-1")
        if coding.strip().lower() != "identity":
            try:  # BodyLimit, outside, has cut a body over the limit already
                body = await receive_body(receive, None, self.max_bytes)
                if body is None:  # the client went away
                    return
                body = decoded_body(coding, body, self.max_bytes).removeprefix(UTF8_BOM)  # counted without it
            except ServingError as exc:
                await _refuse(send, scope, exc)
                return
            headers = [(k, v) for k, v in headers
                       if k not in (b"content-encoding", b"content-length", b"transfer-encoding")]
            headers.append((b"content-length", b"%d" % len(body)))
            receive = _replay(body, receive)
        first = True

        async def without_bom() -> dict:
            nonlocal first
            message = await receive()
            if first and message["type"] == "http.request":
                first = False
                body = message.get("body", b"")
                if body.startswith(UTF8_BOM):
                    message = {**message, "body": body[len(UTF8_BOM):]}
            return message

        await self.app({**scope, "headers": headers}, without_bom, send)


class FormBodies(_PostBodies):
    """The upload routes at ``paths`` (``/classify``) take a multipart form: its media type is matched without
    regard to case, as media types are (``MULTIPART/FORM-DATA`` was read as JSON: "Invalid JSON"), and any other
    body, a picture sent as the body included, is a 415 that says how to upload; so is a form sent with a
    Content-Encoding (BentoML read it as if it had none)."""

    async def handle(self, scope: dict, receive: Any, send: Any, headers: list[tuple[bytes, bytes]]) -> None:
        coding = dict(headers).get(b"content-encoding", b"identity").strip().lower()
        if coding not in (b"identity", b""):
            await _refuse(send, scope, UnsupportedMediaType(
                f"{scope['path']} takes its multipart form without a Content-Encoding (got "
                f"{coding.decode('latin-1')!r}): send it uncompressed, image files are compressed already"))
            return
        content_type = dict(headers).get(b"content-type", b"")
        media_type, semicolon, parameters = content_type.partition(b";")
        if media_type.strip().lower() != b"multipart/form-data":
            sent = (f"a body of type {media_type.strip().decode('latin-1')!r}" if media_type.strip()
                    else "a body without a type")
            await _refuse(send, scope, UnsupportedMediaType(
                f"{scope['path']} takes image files as multipart/form-data in its 'images' field (curl -F "
                f"images=@digit.png -F model=mnist-cnn), not {sent}; JSON pixel arrays go to /predict"))
            return
        if media_type != b"multipart/form-data":  # the boundary (a parameter) keeps its case
            headers = [(k, v) for k, v in headers if k != b"content-type"]
            headers.append((b"content-type", b"multipart/form-data" + semicolon + parameters))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


async def receive_body(receive: Any, declared: str | None, limit: int) -> bytes | None:
    """The request body from ASGI ``receive`` messages, refused with ``PayloadTooLarge`` past ``limit`` bytes (by
    its declared Content-Length first); None when the client went away before it was all in."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict]]:
    """A ``receive`` that gives ``body`` as the whole request body, then hands over to the connection's ``receive``,
    whose body was read to its end (what comes next is the client's disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _refuse(send: Any, scope: dict, exc: ServingError) -> None:
    """Answer an inference request refused before BentoML's app read it, logged and counted as the app's own
    refusals are (door: the route's name, ``/predict`` -> "predict"). The answer ends the connection: the body may
    not have been read, and uvicorn would otherwise read all of it, however long, to find the next request."""
    exc.ends_connection = True
    door = scope["path"].strip("/")
    log_refusal(exc, door)
    count_refusal(exc, door)
    await send_error(send, exc)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 on every route: by Content-Length before anything
    reads them, and chunked bodies (no Content-Length) as soon as the bytes received pass the limit, without
    reading the rest (``BodyTooLarge``: the 413 ends the connection)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:  # the server delivers no more than it declares
            if length.isdigit() and int(length) > self.limit:
                await send_error(send, BodyTooLarge(f"request body of {int(length)} bytes is over the limit of "
                                                    f"{self.limit}"))
                return
            await self.app(scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counting_receive() -> dict:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    return {"type": "http.disconnect"}  # the app stops reading; the rest is never read
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over:  # the 413 below replaces whatever the app answers to the cut-off body
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await send_error(send, BodyTooLarge(f"request body is over the limit of {self.limit} bytes"))


class JsonErrors:
    """Give every HTTP error the service's one shape, ``{"error": message}`` as JSON: the plain-text
    answers of the routers (unknown route 404, 405) and of anything else that is not JSON already, and
    BentoML's own 4xx answers to its exceptions, which it sends as a one-element list ``[{"error": ...}]``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False
        held: dict | None = None  # the start of a JSON error answer, held until its body shows its shape
        body = b""

        async def json_send(message: dict) -> None:
            nonlocal replaced, held, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if not content_type.startswith(b"application/json"):
                    replaced = True
                    status = message["status"]
                    text = f"{status} {HTTPStatus(status).phrase}: {scope.get('method', '')} {scope['path']}"
                    kept = [(k, v) for k, v in message.get("headers") or []  # e.g. a 405's Allow
                            if k.lower() not in (b"content-type", b"content-length")]
                    await send_json(send, status, text, kept)
                    return
                held = message
                return
            if replaced:  # the replaced answer's body
                return
            if held is not None and message["type"] == "http.response.body":
                body += message.get("body", b"")
                if message.get("more_body"):
                    return
                await _send_error_object(send, held, body)
                held = None
                return
            await send(message)

        await self.app(scope, receive, json_send)


async def _send_error_object(send: Any, start: dict, body: bytes) -> None:
    """Send a JSON error answer, unwrapping ``[{"error": ...}]`` into the object, and naming what pydantic found
    wrong in BentoML's validation errors (length header fixed)."""
    parsed = None
    if body.lstrip()[:1] == b"[" or b'"detail"' in body:  # the service's own errors: not parsed again
        with contextlib.suppress(ValueError, RecursionError):
            parsed = json.loads(body)
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict) and "error" in parsed[0]:
        parsed = parsed[0]
    if isinstance(parsed, dict) and "error" in parsed:
        if isinstance(parsed.get("detail"), list) and (found := _validation_problems(parsed["detail"])):
            parsed = {**parsed, "error": f"invalid request: {found}"}
        body = json.dumps(parsed).encode()
        headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
        start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body})


def _validation_problems(detail: list[Any]) -> str:
    """pydantic's errors (BentoML's ``detail``: ``loc``, ``type``, ``msg``) as one sentence: BentoML's own message
    was "1 validation error for Input", which named neither the field nor the problem."""
    problems = []
    for error in detail:
        if not isinstance(error, dict):
            return ""
        loc = error.get("loc")
        field = ".".join(str(part) for part in loc) if isinstance(loc, (list, tuple)) and loc else "the body"
        if error.get("type") == "extra_forbidden":
            problems.append(f"unknown field {field!r} (misspelt?)")
        else:
            problems.append(f"{field}: {error.get('msg', 'invalid')}")
    return "; ".join(problems)


async def send_error(send: Any, exc: ServingError) -> None:
    """Send ``exc``'s JSON error answer (``http_error_answer``: status, headers and body)."""
    status, headers, content = http_error_answer(exc)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def send_json(send: Any, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send ``{"error": message}`` with ``status`` (and ``headers`` besides its content type and length: without a
    length uvicorn sent it chunked, to HTTP/1.0 clients too, which cannot read that)."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestTimeout:
    """Answer 504 when the app has not started its response within ``timeout`` seconds, and cancel it.

    The semantics of BentoML's ``TimeoutMiddleware`` (``traffic.timeout``), which ``serving.service`` swaps
    for this one: BentoML's never cancels its timer, so every request leaves a timer and a future alive for
    the whole timeout. At 2,000 requests/s and 60 s that is over 10^5 of each, and every full garbage
    collection walks them all, stopping the event loop for about 100 ms (serving/README.md, "HTTP tail")."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # the timer cancels this task itself (no task of its own per request: that cost ~20 µs a request),
        # and is cancelled once the response starts or the request ends
        try:
            async with asyncio.timeout(self.timeout) as deadline:

                async def send_and_mark(message: dict) -> None:
                    if deadline.expired():  # the app answers after its cancellation: the 504 below does
                        return
                    deadline.reschedule(None)
                    await send(message)

                await self.app(scope, receive, send_and_mark)
        except TimeoutError:
            if not deadline.expired():  # the app's own TimeoutError
                raise
            await send_json(send, 504, f"not able to process the request in {self.timeout:g} seconds")


def install_request_timeout() -> bool:
    """Make BentoML's HTTP app enforce ``traffic.timeout`` with ``RequestTimeout``, whose timers end with
    their requests (BentoML's outlive them, see ``RequestTimeout``).

    BentoML has no public way to replace or turn off its ``TimeoutMiddleware`` (``traffic.timeout`` must
    be a positive number), so this swaps the class in the private module where BentoML looks it up when it
    builds the app. ``tests/test_asgi.py`` builds the service's real app and fails if BentoML's middleware
    is back. Returns False where this BentoML has no such middleware to swap; its own then stays."""
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:
        return False
    if not hasattr(traffic, "TimeoutMiddleware"):
        return False
    traffic.TimeoutMiddleware = RequestTimeout
    return True


NO_ROUTE = "(no route)"  # the metrics' endpoint label of a request no route takes (a 404)
RAW_PATH = "cnnserve.raw_path"  # where RouteLabels keeps a request's path while BentoML's metrics see its route's


def route_template(routes: Iterable[BaseRoute], path: str) -> str | None:
    """The template of the route that takes ``path`` (``/v2/models/{model}/ready``), through mounts; None if none."""
    for route in routes:
        if isinstance(route, Mount):
            if path == route.path or path.startswith(route.path + "/"):
                if not route.routes:  # an app of its own (static files): whatever it serves under its path
                    return route.path + "/{path}"
                inner = route_template(route.routes, path[len(route.path):] or "/")
                if inner is not None:
                    return route.path if inner == "/" else route.path + inner
        elif isinstance(route, Route) and route.path_regex.match(path):
            return route.path
    return None


class RouteLabels:
    """BentoML's request metrics (``bentoml_service_request_*``) label each request with its raw path: every
    model name, version, typo and scanner probe added series for good (an outside probe's 2,000 unknown paths took
    ``/metrics`` from 6.9 to 54.5 MB and a scrape from 0.11 to 3.6 s, with label values up to 64 KB). These stand
    around BentoML's middleware: ``outer`` shows it the path of the request's route template instead, or
    ``NO_ROUTE``; ``inner`` gives the app behind it the path back. Fixed paths are looked up once."""

    def __init__(self) -> None:
        self._fixed: dict[str, str] = {}

    def label(self, scope: dict[str, Any]) -> str:
        path = scope["path"]
        if (known := self._fixed.get(path)) is not None:
            return known
        app = scope.get("app")
        template = route_template(getattr(app, "routes", ()), path) or NO_ROUTE
        if template == path:  # a route without parameters: as many as the app has routes
            self._fixed[path] = path
        return template

    def outer(self, app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def labelled(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and (label := self.label(scope)) != scope["path"]:
                scope = {**scope, "path": label, RAW_PATH: scope["path"]}
            await app(scope, receive, send)
        return labelled

    @staticmethod
    def inner(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def restored(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if RAW_PATH in scope:
                scope = {**scope, "path": scope[RAW_PATH]}
            await app(scope, receive, send)
        return restored


def install_route_labels() -> bool:
    """Label BentoML's request metrics by route (``RouteLabels``), by swapping its metrics middleware, in the
    private module where BentoML looks it up when it builds the app, for a subclass wrapped in ``RouteLabels``.
    Returns False where this BentoML has no such middleware; its raw-path labels then stay."""
    try:
        from bentoml._internal.server.http import instruments
    except ImportError:
        return False
    metrics = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if metrics is None or getattr(metrics, "_cnnserve_route_labels", False):
        return metrics is not None
    labels = RouteLabels()

    class RouteLabelledMetrics(metrics):  # type: ignore[misc, valid-type]
        _cnnserve_route_labels = True

        def __init__(self, app: Any, **kwargs: Any) -> None:
            super().__init__(labels.inner(app), **kwargs)
            self._labelled = labels.outer(super().__call__)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self._labelled(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics
    return True


MAX_UPLOAD_NAME_BYTES = 200  # BentoML names an upload's temporary file after it; file systems allow 255 bytes


def _shortened(filename: str) -> str:
    """``filename`` cut to ``MAX_UPLOAD_NAME_BYTES`` bytes of UTF-8, its extension kept (it names the format)."""
    stem, dot, suffix = filename.rpartition(".")
    suffix = dot + suffix if stem and len(suffix) <= 16 else ""
    head = filename[: len(filename) - len(suffix)].encode()[: MAX_UPLOAD_NAME_BYTES - len(suffix.encode())]
    return head.decode(errors="ignore") + suffix


def install_multipart_field_check(max_files: int) -> bool:
    """Refuse, with 400 and a message naming the field, a multipart upload that puts a file where the API takes
    a value (``curl -F image=@x.png`` for ``images``, ``-F model=@x.png``): BentoML's multipart parser reads
    such a part as JSON bytes, and one that is not UTF-8 raised out of it as a 500 with a traceback. Also a plain
    value where the API takes files (``-F images=<x.png``): BentoML took it for a URL to download (a 500 when it
    was not one, a fetch from the server when it was). A file name too long for a temporary file's name (a 500)
    is shortened. A body that is not a readable form (no boundary, a part header without a colon, Starlette's
    1,000-field limit) is a 400 that says so, and one with more than ``max_files`` files a 413 (Starlette's own
    400s for these left BentoML's wrapper as 500s with a traceback, and its 1,000-file limit refused uploads the
    service's image limit allows). So is a body that ends before its closing boundary (``--BOUNDARY--``): the
    form parser keeps the parts it finished and drops the cut one without a word, so an upload cut short was
    answered for the files before the cut, or as "images: Field required".

    Wraps ``MultipartSerde.parse_request`` in BentoML's private serde module; Starlette caches the parsed form
    on the request, so the check costs no second parse. ``tests/test_bad_input.py`` sends such uploads to the
    real server. Returns False where this BentoML has no such parser."""
    try:
        from _bentoml_impl.serde import MultipartSerde
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException
        from starlette.formparsers import parse_options_header  # python-multipart's, as Starlette found it
    except ImportError:
        return False
    MultipartSerde._cnnserve_max_files = max_files
    if getattr(MultipartSerde, "_cnnserve_field_check", False):
        return True
    parse_request = MultipartSerde.parse_request

    async def checked_parse_request(self: Any, request: Any, cls: Any) -> Any:
        limit = MultipartSerde._cnnserve_max_files
        media_type, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get(b"boundary") if media_type == b"multipart/form-data" else None  # as Starlette reads it
        closed: list[bool] = []  # filled once the body has been read to its end: whether it was closed
        if boundary:
            request.stream = functools.partial(_watch_close_delimiter, request.stream(), boundary, closed)
        try:  # one file over the limit still parses, for the API's own 413 on the count
            form = await request.form(max_files=limit + 1)
        except HTTPException as exc:  # Starlette's 400 for a body it cannot read as a form
            if "Too many files" in str(exc.detail):
                raise BadInput(f"more than {limit} files uploaded: the limit is {limit} images per request "
                               "(CNNSERVE_MAX_IMAGES_PER_REQUEST)",
                               error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
            raise BadInput(f"the multipart body is not a readable form: {exc.detail}") from None
        finally:
            if boundary:
                del request.stream  # Starlette's own again: a second read is its "Stream consumed"
        if closed == [False]:
            raise BadInput(f"the multipart body ends before its closing boundary (--{boundary.decode('latin-1')}--): "
                           "the upload was cut short, and the part it cut is lost; send the whole form")
        files = sorted(cls.multipart_fields)
        plain = Counter(name for name, value in form.multi_items() if not isinstance(value, UploadFile))
        for name, times in plain.items():
            if times > 1:  # which one to take is a guess (Starlette's: the last)
                raise BadInput(f"multipart field {name!r} is given {times} times: give it once")
        for name, value in form.multi_items():
            if isinstance(value, UploadFile) and name not in cls.multipart_fields:
                where = (f"files go in {' or '.join(repr(f) for f in files)}" if files
                         else "this API takes no files (image files go to /classify)")
                raise BadInput(f"multipart field {name!r} holds a file ({value.filename!r}), but {name!r} is not a "
                               f"file field: {where}; other fields are plain values")
            if value == "" and name in cls.multipart_fields:  # an empty plain value (curl -F images=)
                raise BadInput(f"multipart field {name!r} has no file in it: choose a file to upload")
            if not isinstance(value, UploadFile) and name in cls.multipart_fields:
                raise BadInput(f"multipart field {name!r} holds a plain value, but it takes files (curl -F "
                               f"{name}=@picture.png, not {name}=<picture.png); URLs are not fetched")
            if isinstance(value, UploadFile) and len((value.filename or "").encode()) > MAX_UPLOAD_NAME_BYTES:
                value.filename = _shortened(value.filename)
            if not isinstance(value, UploadFile):
                _check_plain_value(name, value)
        return await parse_request(self, request, cls)

    MultipartSerde.parse_request = checked_parse_request
    MultipartSerde._cnnserve_field_check = True
    return True


def _check_plain_value(name: str, value: str) -> None:
    """Refuse a plain form value that BentoML's ``json.loads`` of it fails on with more than "not JSON" (which it
    takes as text): a number over int()'s 4,300 digits, or nesting past the interpreter's depth (both were 500s)."""
    try:
        json.loads(value)
    except json.JSONDecodeError:
        pass
    except RecursionError:
        raise BadInput(f"multipart field {name!r}: the JSON in it is nested too deeply") from None
    except ValueError:
        raise BadInput(f"multipart field {name!r} holds a number too long to read") from None


async def _watch_close_delimiter(stream: AsyncIterator[bytes], boundary: bytes,
                                 closed: list[bool]) -> AsyncIterator[bytes]:
    """``stream``, the body of a multipart form; once it has ended, ``closed`` holds whether its close delimiter
    (``--boundary--`` at the start of a line, RFC 2046 5.1.1; an epilogue may follow it) went past."""
    delimiter = b"\r\n--" + boundary + b"--"
    keep = len(delimiter) - 1  # what of the body so far a delimiter ending in the next chunk can start in
    seen, tail = False, b"\r\n"  # as if a line ended before the body: a form of no parts is its close delimiter
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            if not seen:  # the chunk alone, and the seam with the bytes before it (not a copy of the whole chunk)
                seen = delimiter in chunk or delimiter in tail + chunk[:keep]
                tail = chunk[-keep:] if len(chunk) >= keep else (tail + chunk)[-keep:]
            yield chunk
    closed.append(seen)


class ClientErrorsQuietly(logging.Filter):
    """BentoML logs a request its validation refuses (HTTP 400), one refused with a client error of its own
    (``BadInput``: ``install_multipart_field_check``), and one whose body stopped (the client went away, or
    ``BodyLimit`` cut it off at the limit), at ERROR with a traceback: log them at INFO, in one line, as the
    service logs its own refusals (``serving.errors.log_refusal``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (ValidationError, BadInput, ClientDisconnect)):
            what = "the request body stopped (client gone, or cut off at the body limit)" \
                if isinstance(exc, ClientDisconnect) else "400: " + " / ".join(str(exc).splitlines()[:2])
            record.msg = f"{record.getMessage()}: {what}"
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_client_errors() -> None:
    """Install ``ClientErrorsQuietly`` on the logger of BentoML's HTTP app, and log uvicorn's warnings (bytes that
    are not HTTP) once: BentoML's logging config gives ``uvicorn.error`` the root's handler and lets its records
    propagate to the root as well, which wrote each of them twice."""
    logging.getLogger(BENTOML_HTTP_LOGGER).addFilter(ClientErrorsQuietly())
    uvicorn_log = logging.getLogger("uvicorn.error")
    if uvicorn_log.handlers and set(uvicorn_log.handlers) <= set(logging.getLogger().handlers):
        uvicorn_log.propagate = False  # only where the root would write the same record again
