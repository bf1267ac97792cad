"""Open Inference Protocol requests, shared by the REST and gRPC doors: the input tensor decoded and checked
against the protocol (name, datatype, shape; the declared image count before any data), requested outputs
and the answer's output tensor (the probabilities, or the top classes under Triton's classification
extension), the request's ``timeout`` parameter."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.dataplane import check_image_count
from serving.errors import InvalidInput
from serving.model_card import INPUT_NAME, LOGITS_NAME, PROBS_NAME
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
        raise InvalidInput(f"input {name!r} has no data: send its values (JSON 'data'; gRPC 'contents') or binary "
                           "data (JSON 'parameters.binary_data_size'; gRPC 'raw_input_contents')")
    array = numbers_to_uint8(values, f"input {name!r}")
    if array.size != int(np.prod(shape)):
        raise InvalidInput(f"input {name!r}: {array.size} values do not fill shape {shape}")
    return array.reshape(shape)


def check_outputs(outputs: list[tuple[Any, Any]]) -> int:
    """Check the requested outputs, each (name, its ``classification`` parameter or None); -> how many top classes
    the classification extension asks for (0: the probabilities themselves)."""
    count, seen = 0, set()
    for name, classification in outputs:
        if not isinstance(name, str) or not name:  # first: a list as a name is not hashable
            raise InvalidInput(f"each requested output needs a 'name'; this service returns {list(SERVED_OUTPUTS)}")
        if name in seen:  # merged, the last would win and the other be dropped unsaid (Triton refuses it too)
            raise InvalidInput(f"output {name!r} is requested twice: name each output once")
        seen.add(name)
        if name == LOGITS_NAME:  # listed in the card, as the model file has it
            raise InvalidInput(f"output {name!r} is in the model file for offline analysis; this service returns "
                               f"{list(SERVED_OUTPUTS)} (calibrated probabilities)")
        if name not in SERVED_OUTPUTS:
            raise InvalidInput(f"unknown output {name!r}; this service returns {list(SERVED_OUTPUTS)}")
        if classification is not None:
            if not isinstance(classification, int) or isinstance(classification, bool) or classification < 0:
                raise InvalidInput(f"output {name!r}: parameters.classification must be a number of classes >= 0, "
                                   f"got {classification!r}")
            count = classification
    return count


@dataclass(frozen=True)
class OutputTensor:
    """The answer's output: ``values`` (a numpy array for FP32, a list of bytes for BYTES) of ``shape``."""

    datatype: str
    shape: list[int]
    values: Any

    def json_data(self) -> list[Any]:
        return [v.decode() for v in self.values] if self.datatype == "BYTES" else self.values.ravel().tolist()

    def raw(self) -> bytes:
        """The binary tensor data extension's encoding: little-endian FP32, or each BYTES element as a 4-byte
        little-endian length and its bytes."""
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(v)) + v for v in self.values)
        return np.ascontiguousarray(self.values, dtype="<f4").tobytes()


def output_tensor(probs: np.ndarray, classes: int, labels: list[str]) -> OutputTensor:
    """``probs`` as FP32, or with ``classes`` > 0 the top ``classes`` of each row, best first, as Triton's
    classification extension has them: BYTES ``"<probability>:<index>:<label>"``, shape (images, classes)."""
    if not classes:
        return OutputTensor("FP32", list(probs.shape), probs)
    classes = min(classes, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :classes]
    values = [f"{probs[row, i]:f}:{i}:{labels[i]}".encode() for row in range(len(probs)) for i in top[row]]
    return OutputTensor("BYTES", [len(probs), classes], values)


def timeout_deadline(timeout_us: Any) -> float | None:
    """The ``time.monotonic()`` deadline of a request's ``parameters.timeout``: microseconds from now, as Triton and
    tritonclient's ``timeout=`` have it (both doors); absent or 0 means no timeout, as in Triton."""
    if timeout_us is None or (timeout_us == 0 and not isinstance(timeout_us, bool)):
        return None
    if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
        raise InvalidInput(f"parameters.timeout must be an integer number of microseconds (0: no timeout), got "
                           f"{timeout_us!r}")
    return time.monotonic() + timeout_us / 1e6
