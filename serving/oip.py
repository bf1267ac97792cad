"""Open Inference Protocol pieces shared by the REST and gRPC doors: metadata, config, input decoding."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving import __version__
from serving.errors import InvalidInput
from serving.inference import bytes_to_uint8, numbers_to_uint8
from serving.model_card import INPUT_NAME, PROBS_NAME
from serving.repository import LoadedModel

SERVER_NAME = "cnnserve"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "health"]
PLATFORM = "onnxruntime_onnx"
SERVED_OUTPUTS = (PROBS_NAME,)


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def model_metadata(model: LoadedModel, versions: list[int]) -> dict[str, Any]:
    card = model.card
    return {
        "name": card.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *card.input.shape]}],
        "outputs": [{"name": PROBS_NAME, "datatype": "FP32", "shape": [-1, *card.probs.shape]}],
        "parameters": {"task": card.task, "layout": card.layout, "labels": card.labels,
                       "providers": model.providers, "device_note": model.device_note or ""},
    }


def model_config(model: LoadedModel) -> dict[str, Any]:
    """A Triton-style model configuration (what perf_analyzer asks for)."""
    card = model.card
    return {
        "name": card.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": model.batcher.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8", "dims": card.input.shape}],
        "output": [{"name": PROBS_NAME, "data_type": "TYPE_FP32", "dims": card.probs.shape}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(model.batcher.max_queue_delay_s * 1e6)},
    }


def decode_input(model: LoadedModel, name: str, datatype: str, shape: Any, raw: bytes | None = None,
                 values: Any = None) -> np.ndarray:
    """One OIP input tensor -> uint8 array, with protocol-level checks (the card checks come after)."""
    if name != INPUT_NAME:
        raise InvalidInput(f"unknown input {name!r}: model {model.name} has one input, {INPUT_NAME!r}")
    if datatype != "UINT8":
        raise InvalidInput(f"input {name!r} has datatype {datatype!r}; model {model.name} takes UINT8")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise InvalidInput(f"input {name!r} shape must be a list of non-negative integers, got {shape!r}")
    shape = list(shape)
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
