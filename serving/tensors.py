"""Request payloads -> uint8 arrays: JSON numbers and raw bytes, the two encodings every door receives."""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import numpy as np

from serving.errors import InvalidInput


def numbers_to_uint8(values: Any, what: str = "input") -> np.ndarray:
    """JSON numbers (nested lists) -> uint8 array; integers 0..255, or floats with integral values."""
    try:
        array = np.asarray(values)
    except ValueError as exc:
        raise InvalidInput(f"{what} is not a rectangular array of numbers: {exc}") from None
    if array.dtype == object or array.dtype.kind not in "iuf":  # true / false are not pixel values
        raise InvalidInput(f"{what} must be numbers (nested lists of integers 0..255)")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InvalidInput(f"{what} contains NaN or infinity")
        if not (array == np.round(array)).all():
            raise InvalidInput(f"{what} must hold integer pixel values 0..255, found fractions")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InvalidInput(f"{what} values must be within 0..255 (uint8), found {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def reject_booleans(values: Any, what: str = "input") -> None:
    """``InvalidInput`` when nested lists ``values`` hold a JSON true / false among their numbers: ``numbers_to_uint8``
    refuses all-boolean data by its dtype, but numpy reads booleans among numbers as 1 and 0 without a trace.
    A pass over every value (~15 µs per 28×28 image), for the doors that cannot rule booleans out more cheaply."""
    level = values if isinstance(values, list) else [values]
    while level:
        if bool in set(map(type, level)):
            raise InvalidInput(f"{what} must be numbers (nested lists of integers 0..255): true / false are not "
                               "pixel values")
        level = list(chain.from_iterable(v for v in level if isinstance(v, list)))


def bytes_to_uint8(raw: bytes, shape: list[int], what: str = "input") -> np.ndarray:
    expected = math.prod(shape)
    if len(raw) != expected:
        raise InvalidInput(f"{what}: {len(raw)} bytes do not match shape {shape} of UINT8 ({expected} bytes)")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
