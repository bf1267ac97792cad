"""Prometheus metrics per model, exported on BentoML's ``/metrics`` (multi-process safe)."""

from __future__ import annotations

import functools
from typing import Any

import bentoml

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = bentoml.metrics.Counter(
    name="cnnserve_requests_total", documentation="Inference requests by model, front door and outcome",
    labelnames=["model", "door", "outcome"])
IMAGES = bentoml.metrics.Counter(
    name="cnnserve_images_total", documentation="Images classified by model", labelnames=["model"])
LATENCY = bentoml.metrics.Histogram(
    name="cnnserve_request_seconds", documentation="End-to-end inference request latency",
    labelnames=["model", "door"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="cnnserve_batch_size", documentation="Images per onnxruntime run", labelnames=["model"],
    buckets=BATCH_BUCKETS)
QUEUE_TIME = bentoml.metrics.Histogram(
    name="cnnserve_queue_seconds", documentation="Time the oldest request of a batch waited in the queue",
    labelnames=["model"], buckets=LATENCY_BUCKETS)


LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
LOOP_LAG = bentoml.metrics.Histogram(
    name="cnnserve_event_loop_lag_seconds",
    documentation="How late each worker's 10 ms event-loop timer fired (serving/loop_lag.py): how long anything "
                  "ready on the worker, a request or a health probe, waited for the loop (1 ms resolution)",
    buckets=LOOP_LAG_BUCKETS)
FALLBACKS = bentoml.metrics.Counter(
    name="cnnserve_version_fallbacks_total",
    documentation="Times a model's default version went down to an older one (its newest removed or failed)",
    labelnames=["model"])
SHED = bentoml.metrics.Counter(
    name="cnnserve_shed_requests_total",
    documentation="Inference requests refused on arrival, before their model is looked up, by reason: loop_lag (the "
                  "worker's event loop was behind, serving/loop_lag.py) or concurrency (the worker had its limit of "
                  "requests in progress: CNNSERVE_MAX_CONCURRENCY over HTTP, CNNSERVE_GRPC_MAX_CONCURRENT_RPCS over "
                  "gRPC)",
    labelnames=["door", "reason"])


def observe_loop_lag(seconds: float) -> None:
    LOOP_LAG.observe(seconds)


def observe_shed(door: str, reason: str) -> None:
    _shed_series(door, reason).inc()


@functools.lru_cache(maxsize=64)
def _shed_series(door: str, reason: str) -> Any:
    return SHED.labels(door=door, reason=reason)


def observe_fallback(model: str) -> None:
    FALLBACKS.labels(model=model).inc()


def observe_batch(model: str, size: int, queue_seconds: float) -> None:
    BATCH_SIZE.labels(model=model).observe(size)
    QUEUE_TIME.labels(model=model).observe(queue_seconds)


@functools.lru_cache(maxsize=4096)
def _request_series(model: str, door: str, outcome: str) -> tuple[Any, Any, Any]:
    """The labelled children one request updates: ``labels()`` looks them up under a lock with keyword
    matching, a few microseconds three times per request on the event loop; the children never change."""
    return (REQUESTS.labels(model=model, door=door, outcome=outcome), LATENCY.labels(model=model, door=door),
            IMAGES.labels(model=model))


def observe_request(model: str, door: str, outcome: str, seconds: float, images: int = 0) -> None:
    requests, latency, image_count = _request_series(model, door, outcome)
    requests.inc()
    if outcome == "ok":
        latency.observe(seconds)
        image_count.inc(images)
