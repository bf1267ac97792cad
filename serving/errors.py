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
