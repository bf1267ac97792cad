"""Errors every front door maps to its protocol: HTTP status codes and gRPC status codes."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request the service refuses; ``message`` says what was wrong."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

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


class PayloadTooLarge(ServingError):
    """Body, batch or image over a configured limit."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(ServingError):
    """Refused or dropped to keep latency bounded: the queue is full, or the request waited too long in it.

    ``retry_after_s`` is the estimated time until the queue has room again (seconds, a float)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServingError):
    """The caller's deadline passed, or cannot be met, before the request was computed."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
