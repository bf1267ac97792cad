"""Where a request's CPU time goes in the service: py-spy samples of every worker under perf_analyzer load,
grouped by layer and turned into microseconds of CPU per request.

    python -m benchmarks.profile_serving --perf-analyzer PA/bin/perf_analyzer [--protocol http grpc]
                                         [--concurrency 1 16] [--seconds 10] [--label after]

For each protocol and concurrency: the service (2 workers, mnist-cnn) is started fresh, perf_analyzer runs
single-image requests, and after a warm-up ``py-spy record`` samples every worker for ``--seconds`` (active
threads only, 250 Hz, ``--nonblocking``) while psutil measures each worker's CPU time. A sample is charged to
the first layer found walking its stack from the innermost frame out (``LAYERS``); CPU µs per request = the
layer's share of samples × the workers' CPU seconds / the requests answered in the window
(``cnnserve_requests_total`` on the service's ``/metrics``). The client (perf_analyzer) shares the cores, so
absolute figures are those of this machine under this load. Writes benchmarks/results/profile_<label>.{json,md}
and the raw collapsed stacks beside them (profile_<label>_<protocol>_c<N>.txt).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from benchmarks.publish import RESULTS, write_results
from benchmarks.serving import cnnserve, pa_env
from serving.model_card import atomic_write

PY_SPY = Path(sys.executable).parent / "py-spy"
# (layer, pattern on a frame "function (file:line)"); the innermost frame that matches one decides
LAYERS = (
    ("onnxruntime", re.compile(r"onnxruntime/")),
    ("numpy", re.compile(r"numpy/")),
    ("protocol parsing/encoding (ours: OIP REST/gRPC, JSON, protobuf)",
     re.compile(r"serving/(oip|oip_rest|oip_grpc|tensors|images)\.py|/json/|google/protobuf|tritonclient/")),
    ("batcher + dataplane (ours)", re.compile(r"serving/(batcher|dataplane|repository|metrics|errors)\.py")),
    ("middleware (ours: body limit, timeout, JSON errors, uvicorn hooks)",
     re.compile(r"serving/(asgi|uvicorn_hooks|listeners)\.py")),
    ("BentoML + Starlette + prometheus/OpenTelemetry", re.compile(
        r"bentoml/|_bentoml_|starlette/|opentelemetry/|prometheus_client/|anyio/|pydantic")),
    ("gRPC library", re.compile(r"grpc/|grpc_")),
    ("uvicorn / HTTP parsing", re.compile(r"uvicorn/|httptools|h11/")),
    ("event loop (asyncio/uvloop, threads)", re.compile(r"asyncio/|uvloop|concurrent/futures|threading\.py")),
)
OTHER = "other"


def requests_answered(http_port: int) -> float:
    """``cnnserve_requests_total`` with outcome ok, over every model and door and all workers."""
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cnnserve_requests_total{") and 'outcome="ok"' in line)


def descendants_by_cpu(pid: int, seconds: float = 1.0) -> list[psutil.Process]:
    """The server's worker processes: its descendants that used CPU over ``seconds`` of load."""
    procs = psutil.Process(pid).children(recursive=True)
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(seconds)
    busy = [p for p in procs if sum(p.cpu_times()[:2]) - before[p.pid] > 0.05 * seconds]
    return sorted(busy, key=lambda p: p.pid)


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for layer, pattern in LAYERS:
            if pattern.search(frame):
                return layer
    return OTHER


def profile_point(pa: Path, protocol: str, concurrency: int, seconds: float, work: Path) -> dict:
    server, http_port, grpc_port = cnnserve({"CNNSERVE_WORKERS": "2"}, work / f"server-{protocol}-{concurrency}.log")
    url = f"127.0.0.1:{grpc_port if protocol == 'grpc' else http_port}"
    total_s = seconds + 6
    client = subprocess.Popen(
        [str(pa), "-m", "mnist-cnn", "-u", url, "-i", protocol, "--concurrency-range", f"{concurrency}:{concurrency}",
         "-p", str(int(total_s * 1000)), "--max-trials", "3", "--stability-percentage", "999"],
        env=pa_env(pa), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        workers = descendants_by_cpu(server.proc.pid)
        cpu0 = {p.pid: sum(p.cpu_times()[:2]) for p in workers}
        records = [(p, work / f"stacks-{protocol}-{concurrency}-{p.pid}.txt") for p in workers]
        spies = [subprocess.Popen([str(PY_SPY), "record", "--pid", str(p.pid), "--duration", str(int(seconds)),
                                   "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p, out in records]
        t0, answered0 = time.monotonic(), requests_answered(http_port)
        for spy in spies:
            spy.wait()
        window, requests = time.monotonic() - t0, requests_answered(http_port) - answered0
        cpu_s = {p.pid: sum(p.cpu_times()[:2]) - cpu0[p.pid] for p in workers}
    finally:
        client.kill()
        server.stop()
    samples: Counter[str] = Counter()
    raw = []
    for _, path in records:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples[classify(stack)] += int(count)
            raw.append(line)
    total = sum(samples.values())
    cpu_total = sum(cpu_s.values())
    us_per_request = {layer: 1e6 * cpu_total * n / total / requests for layer, n in samples.most_common()}
    return {"protocol": protocol, "concurrency": concurrency, "window_s": window, "infer_per_s": requests / window,
            "worker_cpu_s": cpu_s, "cpu_us_per_request": 1e6 * cpu_total / requests, "samples": total,
            "us_per_request": us_per_request, "stacks": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perf-analyzer", type=Path, required=True, help="perf_analyzer binary (tritonclient 2.51)")
    parser.add_argument("--protocol", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--label", default="after", help="results file suffix: profile_<label>")
    args = parser.parse_args()
    if not PY_SPY.exists():
        parser.error(f"py-spy not found at {PY_SPY}: pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="cnnserve-profile-"))
    points = []
    for protocol in args.protocol:
        for concurrency in args.concurrency:
            point = profile_point(args.perf_analyzer, protocol, concurrency, args.seconds, work)
            print(f"{protocol} c={concurrency}: {point['infer_per_s']:.0f} infer/s, "
                  f"{point['cpu_us_per_request']:.0f} CPU µs/request in the workers", flush=True)
            stacks = point.pop("stacks")
            with atomic_write(RESULTS / f"profile_{args.label}_{protocol}_c{concurrency}.txt") as f:
                f.write("\n".join(stacks) + "\n")
            points.append(point)
    command = shlex.join(["python", "-m", "benchmarks.profile_serving", *sys.argv[1:]])
    report = {"command": command, "cores": os.cpu_count(), "points": points}
    print(write_results(f"profile_{args.label}", report, render(report)))


def render(report: dict) -> str:
    lines = [f"# Where a request's CPU goes ({report['command']})", "",
             "py-spy samples of both workers (active threads), charged to the innermost frame's layer; µs = the "
             "layer's share of samples × the workers' CPU seconds ÷ requests answered. perf_analyzer shares the "
             f"{report['cores']} cores. Raw collapsed stacks: the .txt files beside this one.", ""]
    for p in report["points"]:
        lines += [f"## {p['protocol']}, {p['concurrency']} clients: {p['infer_per_s']:.0f} infer/s, "
                  f"{p['cpu_us_per_request']:.0f} CPU µs per request in the workers ({p['samples']} samples)", "",
                  "| layer | CPU µs per request | share |", "|---|---|---|"]
        total = p["cpu_us_per_request"]
        lines += [f"| {layer} | {us:.1f} | {us / total:.0%} |" for layer, us in p["us_per_request"].items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
