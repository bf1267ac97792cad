"""The service on onnxruntime's CUDA provider, beside raw onnxruntime on the same provider: images/s with
64-image requests and p50 latency of a lone client, for a shipped model.

    python -m device_checks.serving_cuda_check [--device cuda] [--model mnist-cnn] [--seconds 10]

Needs onnxruntime-gpu (the ``gpu`` extra) and a CUDA device for ``--device cuda``; ``--device cpu`` runs the same
steps on the CPU provider (how it is tested on machines without a GPU). The service is started as ``make serve``
starts it (``CNNSERVE_DEVICE`` set, ``--workers`` BentoML workers) and driven over HTTP binary tensors with
tritonclient: 1 client sending 1 image (p50), then 4 clients sending 64-image requests (images/s).
Writes device_checks/results/serving_<device>_check.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient

from benchmarks.publish import write_results
from benchmarks.serving import cnnserve, model_path

RESULTS = Path(__file__).resolve().parent / "results"
PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}


def images(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def raw(model: str, device: str, seconds: float) -> dict:
    session = ort.InferenceSession(str(model_path(model)), providers=PROVIDERS[device])
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise SystemExit(f"onnxruntime did not load the CUDA provider: {session.get_providers()}")
    one, batch = images(1), images(64)
    for _ in range(20):
        session.run(None, {"images": batch})
    lone = []
    for _ in range(500):
        t0 = time.perf_counter()
        session.run(["probs"], {"images": one})
        lone.append(time.perf_counter() - t0)
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(["probs"], {"images": batch})
        runs += 1
    return {"p50_ms_batch1": 1000 * statistics.median(lone),
            "images_per_s_batch64": 64 * runs / (time.perf_counter() - t0), "providers": session.get_providers()}


def served(model: str, device: str, workers: int, seconds: float) -> dict:
    process, http_port, _ = cnnserve({"CNNSERVE_DEVICE": device, "CNNSERVE_WORKERS": str(workers)},
                                     Path(tempfile.mkdtemp()) / "server.log")
    url = f"127.0.0.1:{http_port}"
    try:
        def request(client: httpclient.InferenceServerClient, x: np.ndarray) -> None:
            inp = httpclient.InferInput("images", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
            client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("probs")])

        client = httpclient.InferenceServerClient(url)
        one = images(1)
        for _ in range(50):
            request(client, one)
        lone = []
        for _ in range(500):
            t0 = time.perf_counter()
            request(client, one)
            lone.append(time.perf_counter() - t0)

        def loop(_: int) -> int:
            own, batch, sent = httpclient.InferenceServerClient(url), images(64), 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                request(own, batch)
                sent += 64
            return sent

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            sent = sum(pool.map(loop, range(4)))
        metadata = client.get_model_metadata(model)
        return {"p50_ms_batch1": 1000 * statistics.median(lone),
                "images_per_s_batch64": sent / (time.perf_counter() - t0),
                "providers": metadata["parameters"]["providers"], "workers": workers}
    finally:
        process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--workers", type=int, default=2, help="BentoML workers of the service")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    report = {"command": shlex.join(["python", "-m", "device_checks.serving_cuda_check", *sys.argv[1:]]),
              "model": args.model, "device": args.device, "onnxruntime": ort.__version__,
              "raw": raw(args.model, args.device, args.seconds),
              "service": served(args.model, args.device, args.workers, args.seconds)}
    r, s = report["raw"], report["service"]
    md = "\n".join([f"# The service on onnxruntime's {args.device.upper()} provider", "",
                    f"`{report['command']}` — {args.model}, onnxruntime {ort.__version__}; service: {s['workers']} "
                    "workers, HTTP binary tensors from tritonclient on the same machine.", "",
                    "| | p50, 1 client, 1 image (ms) | images/s, 64-image requests | providers |",
                    "|---|---|---|---|",
                    f"| raw onnxruntime | {r['p50_ms_batch1']:.3f} | {r['images_per_s_batch64']:,.0f} | "
                    f"{', '.join(r['providers'])} |",
                    f"| cnnserve | {s['p50_ms_batch1']:.3f} | {s['images_per_s_batch64']:,.0f} (4 clients) | "
                    f"{', '.join(s['providers'])} |", ""])
    print(write_results(f"serving_{args.device}_check", report, md, RESULTS))


if __name__ == "__main__":
    main()
