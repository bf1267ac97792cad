"""Open Inference Protocol requests, shared by the REST and gRPC doors: the input tensor decoded and checked
against the protocol (name, datatype, shape; the declared image count before any data), requested outputs,
the request's ``timeout`` parameter."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from serving.dataplane import check_image_count
from serving.errors import InvalidInput
from serving.model_card import INPUT_NAME, PROBS_NAME
from serving.repository import LoadedModel
from serving.tensors import bytes_to_uint8, numbers_to_uint8

SERVED_OUTPUTS = (PROBS_NAME,)


def decode_input(model: LoadedModel, name: str, datatype: str, shape: Any, max_images: int, raw: bytes | None = None,
                 values: Any = None) -> np.ndarray:
    """One OIP input tensor -> uint8 array, with protocol-level checks (the card checks come after); the
    declared number of images is checked against ``max_images`` before any data is converted."""
    if name != INPUT_NAME:
        raise InvalidInput(f"unknown input {name!r}: model {model.name} has one input, {INPUT_NAME!r}")
    if datatype != "UINT8":
        raise InvalidInput(f"input {name!r} has datatype {datatype!r}; model {model.name} takes UINT8")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise InvalidInput(f"input {name!r} shape must be a list of non-negative integers, got {shape!r}")
    shape = list(shape)
    if shape:
        check_image_count(shape[0], max_images)
    if raw is not None:
        return bytes_to_uint8(raw, shape, f"input {name!r}")
    if values is None:
        raise InvalidInput(f"input {name!r} has no data (neither 'data' nor binary data)")
    array = numbers_to_uint8(values, f"input {name!r}")
    if array.size != int(np.prod(shape)):
        raise InvalidInput(f"input {name!r}: {array.size} values do not fill shape {shape}")
    return array.reshape(shape)


def check_outputs(names: list[str]) -> None:
    for name in names:
        if name not in SERVED_OUTPUTS:
            raise InvalidInput(f"unknown output {name!r}; this service returns {list(SERVED_OUTPUTS)}")


def timeout_deadline(timeout_us: Any) -> float | None:
    """The ``time.monotonic()`` deadline of a request's ``parameters.timeout``: microseconds from now, as Triton and
    tritonclient's ``timeout=`` have it (both doors); absent or 0 means no timeout, as in Triton."""
    if timeout_us is None or (timeout_us == 0 and not isinstance(timeout_us, bool)):
        return None
    if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
        raise InvalidInput(f"parameters.timeout must be an integer number of microseconds (0: no timeout), got "
                           f"{timeout_us!r}")
    return time.monotonic() + timeout_us / 1e6
