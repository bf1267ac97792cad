"""The one error table: each ``ServingError`` carries its HTTP status and gRPC code, and every door answers
with it the same way (HTTP: ``{"error": message}`` as JSON; gRPC: the code with the message).

Refusals are logged without a traceback (client errors at INFO, deliberate 5xx such as overload at
WARNING, at most one line per kind every few seconds with a count); unexpected exceptions are the
doors' to log at ERROR with their traceback."""

from __future__ import annotations

import json
import logging
import math
import time

import grpc

log = logging.getLogger("cnnserve")
LOG_EVERY_S = 5.0
INTERNAL_ERROR = "internal server error (logged)"  # a defect's message to the client: the log has the rest


class ServingError(Exception):
    """A request the service refuses; ``message`` says what was wrong."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    # the outcome it counts as in cnnserve_requests_total: "invalid" (the request is wrong) or "rejected" (the
    # server could not take it now: overload, a deadline, a model not ready; a retry may succeed)
    outcome = "invalid"
    counted = False  # already in cnnserve_requests_total (``DataPlane.infer`` counts what it refuses)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    """Wrong name, datatype, shape, byte length, or undecodable payload."""


class UnprocessableInput(ServingError):
    """Well-formed but unusable content (e.g. not an image, truncated image)."""

    http_status = 422


class UnsupportedMediaType(ServingError):
    http_status = 415


class ModelNotFound(ServingError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(ServingError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    outcome = "rejected"


class PayloadTooLarge(ServingError):
    """Body, batch or image over a configured limit."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BodyTooLarge(PayloadTooLarge):
    """A request body over the byte limit, refused before all of it was read: the answer ends the connection
    (``Connection: close``), as the unread rest of the body would otherwise be taken for the next request's bytes."""

    ends_connection = True


class Overloaded(ServingError):
    """Refused or dropped to keep latency bounded: the queue is full, or the request waited too long in it.

    ``retry_after_s`` is the estimated time until the queue has room again (seconds, a float)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    outcome = "rejected"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyRequests(Overloaded):
    """Refused because the worker already has its limit of requests in progress (``CNNSERVE_MAX_CONCURRENCY``)."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    """The caller's deadline passed, or cannot be met, before the request was computed."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    outcome = "rejected"


def http_error(exc: ServingError) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, JSON body, headers) of ``exc`` on every HTTP route; ``Retry-After`` when the error has one,
    ``Connection: close`` when it ends the connection."""
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if getattr(exc, "ends_connection", False):
        headers["Connection"] = "close"
    return exc.http_status, {"error": exc.message}, headers


def http_error_answer(exc: ServingError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``http_error`` ready to send as ASGI messages: (status, headers with type and length, JSON body)."""
    status, body, extra = http_error(exc)
    content = json.dumps(body).encode()
    return status, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content)),
                    *((k.lower().encode(), v.encode()) for k, v in extra.items())], content


_last_logged: dict[type, tuple[float, int]] = {}


def log_refusal(exc: ServingError, door: str) -> None:
    """Log a refused request without a traceback; repeated refusals of one kind are summed up."""
    kind = type(exc)
    now = time.monotonic()
    last, suppressed = _last_logged.get(kind, (-math.inf, 0))
    if now - last < LOG_EVERY_S:
        _last_logged[kind] = (last, suppressed + 1)
        return
    _last_logged[kind] = (now, 0)
    level = logging.INFO if exc.http_status < 500 else logging.WARNING
    more = f" (and {suppressed} more {kind.__name__} in the last {now - last:.0f} s)" if suppressed else ""
    status = exc.grpc_code.name if "grpc" in door else exc.http_status  # the status the client got
    log.log(level, "%s: %s %s: %s%s", door, kind.__name__, status, exc.message, more)
