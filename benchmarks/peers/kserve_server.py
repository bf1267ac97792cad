"""KServe 0.21 ModelServer serving our ONNX files with onnxruntime, for benchmarks/serving.py.

Runs in its own venv (`pip install kserve onnxruntime 'tritonclient[grpc]'`). KServe binds 0.0.0.0 / [::]
unconditionally; this harness rebinds both to 127.0.0.1, turns per-request logging off, and adds what
perf_analyzer needs and KServe lacks: GET /v2/models/{m}/config and the gRPC ModelConfig method.

`--workers N` is KServe's own way to fill N cores: N uvicorn processes, started with multiprocessing spawn,
each re-importing this module and unpickling the model registry (so each rebuilds its onnxruntime session,
with `--threads` intra-op threads). gRPC stays in the parent process whatever `--workers` is. The parent
always holds a session too (for gRPC), so workers=2 runs 3 sessions; use `--threads 1` with 2 workers on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from multiprocessing import resource_tracker
from pathlib import Path

import grpc
import kserve
import onnxruntime as ort
import uvicorn
from fastapi.responses import JSONResponse
from kserve.model_server import app
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest import server as rest_server

CARDS_ENV = "KSERVE_HARNESS_CARDS"  # JSON {model name: model card}, set by the parent for its worker processes
QUIET_LOGGERS = ("uvicorn.access", "kserve", "kserve.trace")  # per-request logging, off for fair timing


def served_card(name: str) -> dict | None:
    return json.loads(os.environ.get(CARDS_ENV, "{}")).get(name)


def triton_model_config_module():
    """tritonclient's model_config_pb2, loaded by path: importing it as a package module would also load
    tritonclient's grpc_service.proto, whose `inference.*` messages clash with KServe's own."""
    import importlib.util

    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _request_name(data: bytes) -> str:
    """Field 1 (name) of a ModelConfigRequest, decoded by hand (see triton_model_config_module)."""
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        length = shift = 0
        while True:
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if tag == 0x0A:
            return data[i : i + length].decode()
        i += length
    return ""


class OnnxModel(kserve.Model):
    """Pickled into each worker process without its onnxruntime session, which the worker rebuilds."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        super().__init__(name)
        self.path, self.threads = path, threads
        self.card = json.loads((path.parent / "model.json").read_text())
        self.session = self.new_session()
        self.ready = True

    def new_session(self) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "session"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = self.new_session()

    def get_input_types(self) -> list[dict]:
        return [{"name": "images", "datatype": "UINT8", "shape": [-1, *self.card["input"]["shape"]]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "probs", "datatype": "FP32", "shape": [-1, len(self.card["labels"])]}]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        images = payload.inputs[0].as_numpy()
        probs = self.session.run(["probs"], {"images": images})[0]
        output = InferOutput(name="probs", shape=list(probs.shape), datatype="FP32")
        output.set_data_from_numpy(probs, binary_data=payload.use_binary_outputs)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output],
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


def triton_config(card: dict) -> dict:
    return {"name": card["name"], "platform": "onnxruntime_onnx", "max_batch_size": 64,
            "input": [{"name": "images", "data_type": "TYPE_UINT8", "dims": card["input"]["shape"]}],
            "output": [{"name": "probs", "data_type": "TYPE_FP32", "dims": [len(card["labels"])]}]}


@app.get("/v2/models/{name}/config")
async def http_model_config(name: str) -> JSONResponse:
    """Registered at import time: every worker process re-imports this module, then imports KServe's app."""
    card = served_card(name)
    if card is None:
        return JSONResponse({"error": f"model {name!r} is not served"}, status_code=404)
    return JSONResponse(triton_config(card))


def quiet_after(configure_logging):
    """kserve.logging.configure_logging, then per-request loggers at WARNING (each worker process calls it)."""

    @functools.wraps(configure_logging)
    def configure_quietly(*args, **kwargs) -> None:
        configure_logging(*args, **kwargs)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    return configure_quietly


kserve.logging.configure_logging = quiet_after(kserve.logging.configure_logging)


def patch_bindings() -> None:
    """127.0.0.1 instead of 0.0.0.0 / [::], and the ModelConfig gRPC method. Parent process only: it binds the
    HTTP socket that worker processes inherit, and it alone runs gRPC."""
    original_config = uvicorn.Config

    def local_config(*args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        return original_config(*args, **kwargs)

    rest_server.uvicorn.Config = local_config
    original_server = grpc_server.aio.server

    def local_server(*args, **kwargs):
        server = original_server(*args, **kwargs)
        add_port = server.add_insecure_port
        server.add_insecure_port = lambda address: add_port(address.replace("[::]", "127.0.0.1"))

        mc = triton_model_config_module()

        async def model_config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            name = _request_name(request)
            card = served_card(name)
            if card is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served")
            cfg = triton_config(card)
            config = mc.ModelConfig(
                name=cfg["name"], platform=cfg["platform"], max_batch_size=cfg["max_batch_size"],
                input=[mc.ModelInput(name="images", data_type=mc.TYPE_UINT8, dims=cfg["input"][0]["dims"])],
                output=[mc.ModelOutput(name="probs", data_type=mc.TYPE_FP32, dims=cfg["output"][0]["dims"])])
            body = config.SerializeToString()
            return b"\x0a" + _varint(len(body)) + body  # ModelConfigResponse{config = 1}

        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ModelConfig": grpc.unary_unary_rpc_method_handler(model_config)})])
        return server

    grpc_server.aio.server = local_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads per process")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn (HTTP) processes; gRPC stays in the parent")
    args = parser.parse_args()
    patch_bindings()
    models = []
    for name in args.models:
        version = max((p for p in (args.model_dir / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        models.append(OnnxModel(name, version / "model.onnx", args.threads))
    os.environ[CARDS_ENV] = json.dumps({model.name: model.card for model in models})
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                                enable_docs_url=False, enable_latency_logging=False)
    try:
        server.start(models)
    finally:
        # the workers' multiprocessing resource tracker ignores SIGTERM and outlives the parent until it sees its
        # pipe close: close it and reap the tracker here, so nothing is left once the parent has exited
        resource_tracker._resource_tracker._stop()


if __name__ == "__main__":
    main()
