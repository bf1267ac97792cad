"""The one place where requests meet models: validation against the card, batching, and labelling.

Every front door turns its protocol into ``(model name, version, uint8 array)`` and calls ``Inference``;
so every door answers bad input with the same checks and the same messages.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from serving.errors import InvalidInput, PayloadTooLarge, ServingError
from serving.metrics import observe_request
from serving.model_card import ModelCard
from serving.repository import LoadedModel, ModelRepository
from serving.settings import Settings


def expected_shape(card: ModelCard) -> str:
    return f"[N, {', '.join(map(str, card.input.shape))}]"


def validate_batch(card: ModelCard, images: np.ndarray, max_images: int) -> np.ndarray:
    """Check a batch of images against the card; returns it C-contiguous."""
    if images.dtype != np.uint8:
        raise InvalidInput(f"input datatype must be UINT8 (uint8), got {images.dtype}")
    if images.ndim != len(card.input.shape) + 1 or list(images.shape[1:]) != card.input.shape:
        raise InvalidInput(f"input shape {list(images.shape)} does not match model {card.name}: "
                           f"expected {expected_shape(card)} ({card.layout})")
    if images.shape[0] == 0:
        raise InvalidInput("empty batch: at least one image is needed")
    if images.shape[0] > max_images:
        raise PayloadTooLarge(f"batch of {images.shape[0]} images is over the limit of {max_images} per request")
    return np.ascontiguousarray(images)


def numbers_to_uint8(values: Any, what: str = "input") -> np.ndarray:
    """JSON numbers (nested lists) -> uint8 array; integers 0..255, or floats with integral values."""
    try:
        array = np.asarray(values)
    except ValueError as exc:
        raise InvalidInput(f"{what} is not a rectangular array of numbers: {exc}") from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise InvalidInput(f"{what} must be numbers (nested lists of integers 0..255)")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InvalidInput(f"{what} contains NaN or infinity")
        if not (array == np.round(array)).all():
            raise InvalidInput(f"{what} must hold integer pixel values 0..255, found fractions")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InvalidInput(f"{what} values must be within 0..255 (uint8), found {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def bytes_to_uint8(raw: bytes, shape: list[int], what: str = "input") -> np.ndarray:
    expected = math.prod(shape)
    if len(raw) != expected:
        raise InvalidInput(f"{what}: {len(raw)} bytes do not match shape {shape} of UINT8 ({expected} bytes)")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


class Inference:
    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository, self.settings = repository, settings

    def model(self, name: str, version: int | str | None = None) -> LoadedModel:
        return self.repository.get(name, version)

    async def probs(self, model: LoadedModel, images: np.ndarray, door: str) -> np.ndarray:
        """Validated, batched inference; records metrics. Returns float32 (N, K)."""
        t0 = time.perf_counter()
        try:
            images = validate_batch(model.card, images, self.settings.max_images_per_request)
            out = await model.batcher.infer(images)
        except ServingError:
            observe_request(model.name, door, "invalid", time.perf_counter() - t0)
            raise
        except Exception:
            observe_request(model.name, door, "error", time.perf_counter() - t0)
            raise
        observe_request(model.name, door, "ok", time.perf_counter() - t0, len(images))
        return out


def label_predictions(card: ModelCard, probs: np.ndarray, top_k: int = 1) -> list[dict[str, Any]]:
    """Per image: the predicted label(s) and the ``top_k`` most probable labels with probabilities."""
    k = max(1, min(top_k, len(card.labels)))
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        top = [{"label": card.labels[i], "index": int(i), "prob": float(row[i])} for i in order]
        if card.multi_label:
            predicted = [card.labels[i] for i in np.flatnonzero(row > 0.5)]
        else:
            predicted = card.labels[int(np.argmax(row))]
        results.append({"label": predicted, "top_k": top})
    return results
