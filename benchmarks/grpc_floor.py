"""What grpcio's Python server costs per call before any model work: a minimal OIP ``ModelInfer`` server (a fixed
answer, no decoding, no onnxruntime) in each of grpcio's server styles, on one core, perf_analyzer on the other.

    python -m benchmarks.grpc_floor --perf-analyzer PA/bin/perf_analyzer [--rounds 2]

Styles: ``aio`` (``grpc.aio`` on asyncio's loop), ``aio-uvloop`` (the same on uvloop), ``aio-uvloop-intake`` (the
same with the service's call intake, ``serving.oip_grpc.CallIntake``, 16 wide: the service's width when
grpc_floor.md was measured, 64 since), ``sync`` (``grpc.server`` with a thread pool), and ``sync-to-loop`` (the
thread-pool server handing each call to an asyncio loop in another thread and waiting for it: what a sync gRPC door
would need to reach the service's batchers). Each style at 1 and 16 clients, the styles alternating, ``--rounds``
times. CPU µs per call = 1 s of the server's core ÷ calls/s at 16 clients (the server's core is saturated there).
Writes benchmarks/results/grpc_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from statistics import median

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from benchmarks.publish import write_results
from benchmarks.serving import free_port, pa_env

STYLES = ("aio", "aio-uvloop", "aio-uvloop-intake", "sync", "sync-to-loop")
ANSWER = np.zeros((1, 10), np.float32).tobytes()
TENSOR = pb.ModelMetadataResponse.TensorMetadata


def answer(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse.InferOutputTensor(name="probs", datatype="FP32", shape=[1, 10])
    return pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id, outputs=[out],
                                 raw_output_contents=[ANSWER])


# what perf_analyzer asks before it sends: server and model metadata, the model's config
METADATA = {
    "ServerMetadata": pb.ServerMetadataResponse(name="floor", version="1"),
    "ModelMetadata": pb.ModelMetadataResponse(name="mnist-cnn", versions=["1"], platform="onnxruntime_onnx",
                                              inputs=[TENSOR(name="images", datatype="UINT8", shape=[28, 28])],
                                              outputs=[TENSOR(name="probs", datatype="FP32", shape=[10])]),
    "ModelConfig": pb.ModelConfigResponse(config=model_config_pb2.ModelConfig(name="mnist-cnn", max_batch_size=64)),
}


def servicer(infer: object, asynchronous: bool) -> pb_grpc.GRPCInferenceServiceServicer:
    """A servicer answering ``METADATA`` and ``ModelInfer`` with ``infer``."""
    methods: dict[str, object] = {"ModelInfer": infer}
    for name, response in METADATA.items():
        if asynchronous:
            async def constant(self: object, request: object, context: object, r: object = response) -> object:
                return r
        else:
            def constant(self: object, request: object, context: object, r: object = response) -> object:
                return r
        methods[name] = constant
    return type("Floor", (pb_grpc.GRPCInferenceServiceServicer,), methods)()


def serve(style: str, port: int) -> None:
    """Run the minimal server of ``style`` on 127.0.0.1:``port`` until killed."""
    address = f"127.0.0.1:{port}"
    if style.startswith("aio"):
        async def infer(self: object, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
            return answer(request)

        async def main() -> None:
            server = grpc.aio.server()
            intake = None
            if style == "aio-uvloop-intake":  # registered as the service registers its servicer
                from serving.oip_grpc import INFER_METHOD, CallIntake, add_inference_servicer

                handlers = add_inference_servicer(servicer(infer, True), server)
                intake = CallIntake(server, INFER_METHOD, handlers, lambda: None, lambda: None, 16)  # no limit
            else:
                pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer(infer, True), server)
            server.add_insecure_port(address)
            await server.start()
            if intake is not None:
                intake.start()
            await server.wait_for_termination()

        if style.startswith("aio-uvloop"):
            import uvloop
            uvloop.install()
        asyncio.run(main())
        return
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def on_loop(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return answer(request)

    def infer(self: object, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        if style == "sync-to-loop":
            return asyncio.run_coroutine_threadsafe(on_loop(request), loop).result()
        return answer(request)

    server = grpc.server(futures.ThreadPoolExecutor(32))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer(infer, False), server)
    server.add_insecure_port(address)
    server.start()
    server.wait_for_termination()


def measure(pa: Path, style: str, clients: int) -> dict:
    port = free_port()
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "benchmarks.grpc_floor", "--serve", style,
                               str(port)], cwd=Path(__file__).resolve().parent.parent)
    try:
        time.sleep(3)
        out = subprocess.run(["taskset", "-c", "1", str(pa), "-m", "mnist-cnn", "-u", f"127.0.0.1:{port}", "-i", "grpc",
                              "--concurrency-range", f"{clients}:{clients}", "-p", "2000", "-r", "3", "-s", "100"],
                             capture_output=True, text=True, env=pa_env(pa), timeout=120)
        text = out.stdout + out.stderr
        rate, p50 = re.search(r"Throughput: ([\d.]+)", text), re.search(r"p50 latency: (\d+)", text)
        if not (rate and p50):
            raise RuntimeError(f"perf_analyzer failed for {style}:\n{text[-2000:]}")
        return {"style": style, "clients": clients, "calls_per_s": float(rate.group(1)), "p50_us": int(p50.group(1))}
    finally:
        server.kill()
        server.wait()


def render(rows: list[dict], command: str) -> str:
    lines = [f"# What grpcio's Python server costs per call (`{command}`)", "",
             "A minimal OIP ModelInfer server (fixed answer: no decoding, no model) on core 0, perf_analyzer on "
             "core 1; median (min-max) over rounds, styles alternating.", "",
             "| server style | 1 client: p50 µs | 16 clients: calls/s | CPU µs per call at 16 clients |",
             "|---|---|---|---|"]
    for style in STYLES:
        one = [r["p50_us"] for r in rows if r["style"] == style and r["clients"] == 1]
        many = [r["calls_per_s"] for r in rows if r["style"] == style and r["clients"] == 16]
        lines.append(f"| {style} | {median(one):.0f} ({min(one)}-{max(one)}) | {median(many):,.0f} "
                     f"({min(many):,.0f}-{max(many):,.0f}) | {1e6 / median(many):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--perf-analyzer", type=Path, help="Triton's perf_analyzer binary")
    parser.add_argument("--rounds", type=int, default=2, help="times every style is measured, alternating")
    parser.add_argument("--serve", nargs=2, metavar=("STYLE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if args.perf_analyzer is None or os.cpu_count() < 2:
        parser.error("--perf-analyzer is required, and 2 cores (server and client pinned apart)")
    rows = [measure(args.perf_analyzer, style, clients)
            for _ in range(args.rounds) for style in STYLES for clients in (1, 16)]
    for row in rows:
        print(row)
    command = f"python -m benchmarks.grpc_floor --perf-analyzer {args.perf_analyzer} --rounds {args.rounds}"
    print(write_results("grpc_floor", {"command": command, "rows": rows}, render(rows, command)))


if __name__ == "__main__":
    main()
