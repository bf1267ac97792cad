"""cnnserve's in-process batcher vs BentoML's adaptive batching, on the same load.

    python -m benchmarks.batching [--model mnist-cnn] [--seconds 10]

Both servers are BentoML services answering JSON over HTTP with the same ONNX file and onnxruntime
threads; the only difference is who forms the batches. An asyncio httpx client keeps N requests in
flight (single images) for a fixed time. Writes benchmarks/results/batching.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.publish import write_results
from benchmarks.serving import ROOT, Process, cnnserve, free_port, model_path

CONCURRENCY = (1, 16, 64)


async def load(url: str, body: dict, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        await client.post(url, json=body)  # warm-up
        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"concurrency": concurrency, "req_per_s": len(latencies) / elapsed, "errors": errors,
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-latency-ms", nargs="+", type=int, default=[1000, 20],
                        help="BentoML adaptive batching max_latency_ms settings to try")
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 256, size=(28, 28)).tolist()
    logs = Path("/tmp")
    rows = []
    # one worker with 2 onnxruntime threads on both sides: only the batching differs
    server, http_port, _ = cnnserve({"CNNSERVE_GRPC_PORT": "0", "CNNSERVE_WORKERS": "1"},
                                    logs / "batching-cnnserve.log")
    try:
        for c in CONCURRENCY:
            r = asyncio.run(load(f"http://127.0.0.1:{http_port}/predict", {"instances": [image], "model": args.model},
                                 c, args.seconds))
            rows.append({"server": "cnnserve batcher (/predict)", **r})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    for max_latency in args.max_latency_ms:
        port = free_port()
        env = {"BATCHING_BENCH_MODEL": str(model_path(args.model)),
               "BATCHING_BENCH_MAX_LATENCY_MS": str(max_latency), "BENTOML_DO_NOT_TRACK": "True",
               "PYTHONPATH": str(ROOT)}
        service = "benchmarks.bentoml_batching_service:AdaptiveBatching"
        proc = Process([sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(port)],
                       env, f"http://127.0.0.1:{port}/readyz", logs / "batching-bentoml.log")
        try:
            for c in CONCURRENCY:
                r = asyncio.run(load(f"http://127.0.0.1:{port}/predict_batch", {"instances": [image]}, c,
                                     args.seconds))
                rows.append({"server": f"BentoML adaptive batching (max_latency_ms={max_latency})", **r})
                print(rows[-1], flush=True)
        finally:
            proc.stop()
    command = shlex.join(["python", "-m", "benchmarks.batching", *sys.argv[1:]])
    lines = ["# Batching: cnnserve's batcher vs BentoML adaptive batching", "",
             f"`{command}` — {args.model}, single-image JSON requests, client and server on the same 2 cores.", "",
             "| batching | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['concurrency']} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['errors']} |" for r in rows]
    print(write_results("batching", {"command": command, "model": args.model, "rows": rows}, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
