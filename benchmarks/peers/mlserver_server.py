"""Seldon MLServer 1.7 serving our ONNX files with onnxruntime, for benchmarks/serving.py.

Runs in its own venv (`pip install mlserver onnxruntime`). MLServer has no ONNX runtime of its own: a
small custom MLModel runs onnxruntime with `--threads` intra-op threads per process.
`--parallel-workers N` is MLServer's own setting: 0 runs the model in the server process, N > 0 in N
spawned worker processes (the server process then decodes, batches and dispatches). MLServer 1.7.1's
workers crash at start under uvloop >= 0.22 (SeldonIO/MLServer#2286): for N > 0 its venv needs
`pip install 'uvloop<0.22'`. Adaptive batching is on by default (`--max-batch-size 64
--max-batch-time-ms 2`); `--max-batch-size` 0 or 1, or a zero batch time, turns it off. With parallel
workers, batches are formed in the server process and each batch goes to one worker.
It lacks the binary tensor extension and Triton's ModelConfig: HTTP JSON only, with a custom handler
for GET /v2/models/{m}/config so perf_analyzer works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from packaging.version import Version

THREADS_ENV = "ORT_THREADS"  # onnxruntime intra-op threads, read by the model in whichever process loads it


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = Path(self.settings.parameters.uri)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ[THREADS_ENV])
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.card = json.loads((path.parent / "model.json").read_text())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0]).astype(np.uint8)
        probs = self.session.run(["probs"], {"images": images})[0]
        # no `parameters` on the output: perf_analyzer's JSON mode rejects any
        output = ResponseOutput(name="probs", shape=list(probs.shape), datatype="FP32", data=probs.ravel().tolist())
        return InferenceResponse(model_name=self.name, outputs=[output])

    @custom_handler(rest_path="/v2/models/{model_name}/config", rest_method="GET")
    async def config(self) -> dict:
        return {"name": self.name, "platform": "onnxruntime_onnx", "max_batch_size": 64,
                "input": [{"name": "images", "data_type": "TYPE_UINT8", "dims": self.card["input"]["shape"]}],
                "output": [{"name": "probs", "data_type": "TYPE_FP32", "dims": [len(self.card["labels"])]}]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads per process")
    parser.add_argument("--parallel-workers", type=int, default=0,
                        help="model worker processes; 0 runs the model in the server process")
    parser.add_argument("--max-batch-size", type=int, default=64, help="adaptive batching; 0 or 1 turns it off")
    parser.add_argument("--max-batch-time-ms", type=float, default=2.0, help="adaptive batching wait")
    args = parser.parse_args()
    if args.parallel_workers > 0 and Version(metadata.version("uvloop")) >= Version("0.22"):
        parser.error("--parallel-workers needs uvloop < 0.22 (MLServer 1.7.1 workers crash at start under "
                     "uvloop >= 0.22, SeldonIO/MLServer#2286): pip install 'uvloop<0.22'")
    root = Path(tempfile.mkdtemp(prefix="mlserver-"))
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": args.http_port, "grpc_port": 0, "metrics_port": 0,
        "parallel_workers": args.parallel_workers, "debug": False, "metrics_endpoint": None}))
    for name in args.models:
        version = max((p for p in (args.model_dir / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        card = json.loads((version / "model.json").read_text())
        (root / name).mkdir()
        (root / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_server.OnnxRuntimeModel",
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, *card["input"]["shape"]]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, len(card["labels"])]}],
            "max_batch_size": args.max_batch_size, "max_batch_time": args.max_batch_time_ms / 1000,
            "parameters": {"uri": str(version / "model.onnx")}}))
    os.environ[THREADS_ENV] = str(args.threads)
    os.environ["PYTHONPATH"] = f"{Path(__file__).parent}:{os.environ.get('PYTHONPATH', '')}"
    mlserver = Path(sys.executable).parent / "mlserver"
    os.execv(str(mlserver), [str(mlserver), "start", str(root)])


if __name__ == "__main__":
    main()
