"""The alternative we measured against: BentoML's own adaptive batching around the same ONNX model.

Served by benchmarks.batching only (`bentoml serve benchmarks.bentoml_batching_service:AdaptiveBatching`):
`POST /predict_batch` takes `{"instances": [image, ...]}` like cnnserve's /predict, but batches with
`@bentoml.api(batchable=True)` (BentoML's adaptive batching) instead of cnnserve's in-process batcher.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort

MODEL = os.environ["BATCHING_BENCH_MODEL"]
MAX_LATENCY_MS = int(os.environ.get("BATCHING_BENCH_MAX_LATENCY_MS", "1000"))


@bentoml.service(name="adaptive-batching", workers=1, logging={"access": {"enabled": False}})
class AdaptiveBatching:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self.session = ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])

    @bentoml.api(route="/predict_batch", batchable=True, max_batch_size=64, max_latency_ms=MAX_LATENCY_MS)
    def predict_batch(self, instances: np.ndarray) -> np.ndarray:
        return self.session.run(["probs"], {"images": instances.astype(np.uint8)})[0]
