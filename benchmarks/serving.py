"""Serving benchmark: raw onnxruntime, this service (HTTP binary, HTTP JSON, gRPC) and the peers
(KServe ModelServer, Seldon MLServer) serving the same ONNX files, measured with Triton's perf_analyzer.

    python -m benchmarks.serving --perf-analyzer PA/bin/perf_analyzer [--kserve-python K/bin/python]
                                 [--mlserver-python M/bin/python]

Single-image requests at concurrency 1, 16 and 64, and client batches of 8 at concurrency 16, for
mnist-cnn and pneumoniamnist-cnn. Everything runs on this machine: the load generator shares its cores
with the server. Writes benchmarks/results/serving.{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from benchmarks.publish import RESULTS, write_results
from serving.model_card import atomic_write

ROOT = Path(__file__).resolve().parents[1]

PEERS = ROOT / "benchmarks" / "peers"
MODELS = ("mnist-cnn", "pneumoniamnist-cnn")
LOADS = ((1, 1), (16, 1), (64, 1), (16, 8))  # (concurrency, client batch)


@dataclass
class Result:
    server: str
    protocol: str
    model: str
    concurrency: int
    batch: int
    infer_per_s: float  # requests per second
    images_per_s: float
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(name: str) -> Path:
    versions = [p for p in (ROOT / "exports" / name).iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) / "model.onnx"


def raw_onnxruntime(name: str, threads: int, seconds: float = 3.0) -> list[Result]:
    """In-process onnxruntime: the ceiling for any server on this machine."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path(name)), options, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape[1:]]
    out = []
    for batch in (1, 8, 16, 64):
        x = np.random.default_rng(0).integers(0, 256, size=(batch, *shape), dtype=np.uint8)
        session.run(None, {"images": x})
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            session.run(["probs"], {"images": x})
            times.append(time.perf_counter() - t0)
        t = np.array(times)
        out.append(Result("onnxruntime in-process", f"{threads} threads", name, 1, batch, len(t) / t.sum(),
                          batch * len(t) / t.sum(), 1000 * float(np.percentile(t, 50)),
                          1000 * float(np.percentile(t, 99))))
    return out


class Process:
    """A server subprocess in its own process group, waited for on an HTTP URL."""

    def __init__(self, cmd: list[str], env: dict[str, str], ready_url: str, log: Path, cwd: Path = ROOT) -> None:
        self.log = log
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=cwd, stdout=open(log, "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    self.ready_s = 120 - (deadline - time.monotonic())
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"not ready: {ready_url}\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def perf_analyzer(pa: Path, server: str, protocol: str, url: str, model: str, concurrency: int, batch: int,
                  window_ms: int, json_tensors: bool = False) -> Result | None:
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        cmd = [str(pa), "-m", model, "-u", url, "-i", "grpc" if protocol == "grpc" else "http",
               "--concurrency-range", f"{concurrency}:{concurrency}", "-b", str(batch), "-p", str(window_ms),
               "--max-trials", "8", "--stability-percentage", "30", "-f", out.name, "--percentile", "99"]
        if json_tensors:
            cmd += ["--input-tensor-format=json", "--output-tensor-format=json"]
        env = {**os.environ, "LD_LIBRARY_PATH": str(pa.parent.parent / "lib" / "python3.11" / "site-packages" /
                                                    "nvidia" / "cuda_runtime" / "lib")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if done.returncode != 0:
            print(f"  perf_analyzer failed for {server} {protocol} {model} c={concurrency} b={batch}:\n"
                  f"{done.stdout[-1500:]}{done.stderr[-1500:]}", file=sys.stderr)
            return None
        with open(out.name) as f:
            row = next(csv.DictReader(f))
    infer = float(row["Inferences/Second"])  # perf_analyzer counts images (batch x requests)
    return Result(server, protocol, model, concurrency, batch, infer / batch, infer,
                  float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000)


def cnnserve(env: dict[str, str], log: Path) -> tuple[Process, int, int]:
    http_port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:CnnServe", "--host", "127.0.0.1",
           "--port", str(http_port)]
    env = {"CNNSERVE_GRPC_PORT": str(grpc_port), "CNNSERVE_MODEL_DIR": str(ROOT / "exports"),
           "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(ROOT), **env}
    return Process(cmd, env, f"http://127.0.0.1:{http_port}/readyz", log), http_port, grpc_port


def run_loads(pa: Path, server: str, targets: dict[str, str], models: tuple[str, ...], window_ms: int) -> list[Result]:
    """targets: protocol -> URL; protocol is http (binary tensors), http-json or grpc."""
    out = []
    for model in models:
        for protocol, url in targets.items():
            for concurrency, batch in LOADS:
                r = perf_analyzer(pa, server, "grpc" if protocol == "grpc" else "http", url, model, concurrency,
                                  batch, window_ms, json_tensors=protocol == "http-json")
                if r:
                    r.protocol = protocol
                    out.append(r)
                    print(f"  {server:28s} {protocol:9s} {model:20s} c={concurrency:<3d} b={batch}: "
                          f"{r.infer_per_s:8.0f} infer/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perf-analyzer", type=Path, required=True, help="perf_analyzer binary (tritonclient 2.51)")
    parser.add_argument("--kserve-python", type=Path, help="python of a venv with kserve + onnxruntime")
    parser.add_argument("--mlserver-python", type=Path, help="python of a venv with mlserver + onnxruntime")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer measurement window")
    parser.add_argument("--workers", type=int, default=0, help="cnnserve BentoML workers (0 = one per core)")
    args = parser.parse_args()
    models = tuple(args.models)
    logs = Path(tempfile.mkdtemp(prefix="cnnserve-bench-"))
    results: list[Result] = []
    threads = os.cpu_count() or 1
    for model in models:
        results += raw_onnxruntime(model, threads)
    print("raw onnxruntime done", flush=True)

    readiness = {}
    t0 = time.monotonic()
    server, http_port, grpc_port = cnnserve({"CNNSERVE_WORKERS": str(args.workers)}, logs / "cnnserve.log")
    readiness["cnnserve"] = time.monotonic() - t0
    try:
        results += run_loads(args.perf_analyzer, "cnnserve", {
            "http": f"127.0.0.1:{http_port}", "http-json": f"127.0.0.1:{http_port}",
            "grpc": f"127.0.0.1:{grpc_port}"}, models, args.window_ms)
    finally:
        server.stop()

    if args.kserve_python:
        http_port, grpc_port = free_port(), free_port()
        proc = Process([str(args.kserve_python), str(PEERS / "kserve_server.py"), "--http-port", str(http_port),
                        "--grpc-port", str(grpc_port), "--model-dir", str(ROOT / "exports"), *models], {},
                       f"http://127.0.0.1:{http_port}/v2/health/ready", logs / "kserve.log")
        try:
            results += run_loads(args.perf_analyzer, "KServe 0.21 (1 process)", {
                "http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}, models, args.window_ms)
        finally:
            proc.stop()
    if args.mlserver_python:
        http_port = free_port()
        proc = Process([str(args.mlserver_python), str(PEERS / "mlserver_server.py"), "--http-port", str(http_port),
                        "--model-dir", str(ROOT / "exports"), *models], {},
                       f"http://127.0.0.1:{http_port}/v2/health/ready", logs / "mlserver.log")
        try:
            results += run_loads(args.perf_analyzer, "MLServer 1.7 (adaptive batching)",
                                 {"http-json": f"127.0.0.1:{http_port}"}, models, args.window_ms)
        finally:
            proc.stop()

    command = shlex.join(["python", "-m", "benchmarks.serving", *sys.argv[1:]])
    report = {"command": command, "cores": os.cpu_count(), "ready_s": readiness,
              "note": "client (perf_analyzer) and server share the same cores",
              "results": [asdict(r) for r in results]}
    print(write_results("serving", report, render(report)))
    plot(results, RESULTS / "serving.png")


def render(report: dict) -> str:
    rows = [Result(**r) for r in report["results"]]
    lines = ["# Serving benchmark", "", f"`{report['command']}` — {report['cores']} cores, {report['note']}.",
             f"cnnserve ready {report['ready_s'].get('cnnserve', float('nan')):.1f} s after start "
             "(all shipped models loaded).", "",
             "infer/s = requests per second (a request carries `batch` images).", "",
             "| server | protocol | model | concurrency | batch | infer/s | images/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.server} | {r.protocol} | {r.model} | {r.concurrency} | {r.batch} | {r.infer_per_s:.0f} | "
                     f"{r.images_per_s:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[Result]] = {}
    for r in results:
        if r.model == "mnist-cnn" and r.batch == 1 and r.server != "onnxruntime in-process":
            series.setdefault(f"{r.server} / {r.protocol}", []).append(r)
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r.concurrency)
        xs = [r.concurrency for r in rs]
        ax_tp.plot(xs, [r.infer_per_s for r in rs], "o-", label=label)
        ax_p99.plot(xs, [r.p99_ms for r in rs], "o-", label=label)
    for ax, title in ((ax_tp, "throughput (infer/s)"), (ax_p99, "p99 latency (ms)")):
        ax.set(xscale="log", xlabel="concurrent clients", title=f"mnist-cnn, single-image requests: {title}")
        ax.set_xticks([1, 16, 64], ["1", "16", "64"])
        ax.grid(alpha=0.3)
    ax_p99.set_yscale("log")
    ax_tp.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:], dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
