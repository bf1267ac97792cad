"""Serving benchmark: this service against its peers, each in the setting its own users would choose for the
cores at hand, measured with Triton's perf_analyzer on the same ONNX file.

    python -m benchmarks.serving --perf-analyzer PA/bin/perf_analyzer --kserve-python K/bin/python \\
        --mlserver-python M/bin/python [--runs 3] [--window-ms 3000] [--grpc-fresh-starts 10]

Servers (mnist-cnn, the latest shipped version):
  * cnnserve: one BentoML worker per core, one onnxruntime thread each (a lone request may use every core);
    HTTP binary tensors, HTTP JSON tensors, gRPC;
  * KServe 0.21: ``workers`` = cores with 1 onnxruntime thread each (its ``--workers``; gRPC stays in the parent
    process), and 1 process with cores threads (how its examples run); HTTP binary and gRPC;
  * MLServer 1.7: adaptive batching (64 images, 2 ms) in the server process with cores threads, and with
    ``parallel_workers`` = cores at 1 thread each; HTTP JSON (it has no binary tensor extension; its gRPC lacks
    the ModelConfig call perf_analyzer needs);
  * onnxruntime in the benchmark's own process (no server): the ceiling, batch 1 and 8, 1 and cores threads.

Loads: 1 image per request at 1, 16 and 64 concurrent clients, and 8-image requests at 16. Each point is three
fixed perf_analyzer windows of ``--window-ms`` (no stability retries: what it measured is what is reported).
The whole set is run ``--runs`` times, the server order reversed on every other run; each cell reports the
median and the min–max over runs, and a point that failed is reported as failed, never dropped. Per point the
CPU the server's processes and perf_analyzer used is measured (cores busy, from psutil). ``--grpc-fresh-starts``
restarts cnnserve N times and measures gRPC at 16 clients each time: SO_REUSEPORT hashes gRPC connections onto
workers, so the spread over fresh starts is part of the result (``--fresh-clients`` sets the clients). Client and
servers share the machine's cores.
Writes benchmarks/results/serving.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil

from benchmarks.publish import RESULTS, write_results
from serving.model_card import atomic_write

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
MODEL = "mnist-cnn"
LOADS = ((1, 1), (16, 1), (64, 1), (16, 8))  # (concurrent clients, images per request)
CORES = os.cpu_count() or 1


@dataclass
class Point:
    server: str
    door: str  # http (binary tensors), http-json, grpc, or the in-process session's threads
    concurrency: int
    batch: int
    run: int
    images_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cores: float | None = None  # CPU seconds of the server's processes per second of the point
    client_cores: float | None = None  # the same for perf_analyzer
    error: str | None = None


@dataclass
class Server:
    name: str
    doors: dict[str, str]  # door -> "host:port"
    start: Callable[[Path], Process]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(name: str = MODEL) -> Path:
    versions = [p for p in (ROOT / "exports" / name).iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) / "model.onnx"


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
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"not ready: {ready_url}\n{log.read_text()[-3000:]}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process and every descendant alive now."""
        total = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for p in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += sum(p.cpu_times()[:2])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def pa_env(pa: Path) -> dict[str, str]:
    """perf_analyzer's environment: it needs the CUDA runtime library of its venv even on a CPU machine."""
    lib = pa.parent.parent / "lib" / "python3.11" / "site-packages" / "nvidia" / "cuda_runtime" / "lib"
    return {**os.environ, "LD_LIBRARY_PATH": str(lib)}


def perf_analyzer(pa: Path, point: Point, url: str, window_ms: int, server: Process) -> Point:
    """Three fixed windows of ``window_ms`` at ``point``'s load; fills in ``point`` (or its error)."""
    protocol = "grpc" if point.door == "grpc" else "http"
    cmd = [str(pa), "-m", MODEL, "-u", url, "-i", protocol, "-b", str(point.batch),
           "--concurrency-range", f"{point.concurrency}:{point.concurrency}", "-p", str(window_ms),
           "--max-trials", "3", "--stability-percentage", "1000", "--percentile", "99"]
    if point.door == "http-json":
        cmd += ["--input-tensor-format=json", "--output-tensor-format=json"]
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    client = psutil.Popen(cmd, env=pa_env(pa), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client_cpu = 0.0
    try:
        while client.poll() is None:  # its CPU times are readable only while it lives
            client_cpu = sum(client.cpu_times()[:2])
            time.sleep(0.2)
    except psutil.NoSuchProcess:
        pass
    output = client.stdout.read()
    wall = time.monotonic() - t0
    point.server_cores, point.client_cores = (server.cpu_seconds() - cpu0) / wall, client_cpu / wall
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", output)
    p50 = re.search(r"p50 latency: (\d+) usec", output)
    p99 = re.search(r"p99 latency: (\d+) usec", output)
    if client.returncode != 0 or not (throughput and p50 and p99):
        point.error = " / ".join(line.strip() for line in output.splitlines()[-4:] if line.strip())[-300:]
        return point
    point.images_per_s = float(throughput.group(1))  # perf_analyzer counts images (batch x requests)
    point.p50_ms, point.p99_ms = int(p50.group(1)) / 1000, int(p99.group(1)) / 1000
    return point


def raw_onnxruntime(run: int, seconds: float = 3.0) -> list[Point]:
    """onnxruntime in this process, no server: the ceiling on this machine."""
    points = []
    for threads in sorted({1, CORES}):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model_path()), options, providers=["CPUExecutionProvider"])
        for batch in (1, 8):
            x = np.random.default_rng(0).integers(0, 256, size=(batch, 28, 28), dtype=np.uint8)
            for _ in range(50):
                session.run(["probs"], {"images": x})
            times = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                session.run(["probs"], {"images": x})
                times.append(time.perf_counter() - t0)
            t = np.array(times)
            points.append(Point("onnxruntime in-process", f"{threads} thread{'s' * (threads > 1)}", 1, batch, run,
                                batch * len(t) / t.sum(), 1000 * float(np.percentile(t, 50)),
                                1000 * float(np.percentile(t, 99))))
    return points


def cnnserve_process(log: Path, http_port: int, grpc_port: int, env: dict[str, str] | None = None) -> Process:
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:CnnServe", "--host", "127.0.0.1",
           "--port", str(http_port)]
    env = {"CNNSERVE_GRPC_PORT": str(grpc_port), "CNNSERVE_MODEL_DIR": str(ROOT / "exports"),
           "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(ROOT), **(env or {})}
    return Process(cmd, env, f"http://127.0.0.1:{http_port}/readyz", log)


def cnnserve(env: dict[str, str], log: Path) -> tuple[Process, int, int]:
    """Start the service on free ports: (process, HTTP port, gRPC port)."""
    http_port, grpc_port = free_port(), free_port()
    return cnnserve_process(log, http_port, grpc_port, env), http_port, grpc_port


def servers(args: argparse.Namespace) -> list[Server]:
    """The servers to measure, each with fixed ports and a start function."""
    found = []
    http, grpc = free_port(), free_port()
    found.append(Server("cnnserve", {"http": f"127.0.0.1:{http}", "http-json": f"127.0.0.1:{http}",
                                     "grpc": f"127.0.0.1:{grpc}"},
                        lambda log, h=http, g=grpc: cnnserve_process(log, h, g)))
    if args.kserve_python:
        for workers, threads in ((CORES, 1), (1, CORES)):
            http, grpc = free_port(), free_port()
            cmd = [str(args.kserve_python), str(PEERS / "kserve_server.py"), MODEL, "--model-dir",
                   str(ROOT / "exports"), "--http-port", str(http), "--grpc-port", str(grpc), "--workers", str(workers),
                   "--threads", str(threads)]
            found.append(Server(f"KServe 0.21 workers={workers}, {threads} thread{'s' * (threads > 1)}",
                                {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"},
                                lambda log, c=cmd, h=http: Process(c, {}, f"http://127.0.0.1:{h}/v2/health/ready",
                                                                   log)))
    if args.mlserver_python:
        for workers, threads in ((0, CORES), (CORES, 1)):
            http = free_port()
            cmd = [str(args.mlserver_python), str(PEERS / "mlserver_server.py"), MODEL, "--model-dir",
                   str(ROOT / "exports"), "--http-port", str(http), "--parallel-workers", str(workers),
                   "--threads", str(threads), "--max-batch-size", "64", "--max-batch-time-ms", "2"]
            label = f"parallel_workers={workers}, 1 thread" if workers else f"in-process, {threads} threads"
            found.append(Server(f"MLServer 1.7 adaptive batching, {label}", {"http-json": f"127.0.0.1:{http}"},
                                lambda log, c=cmd, h=http: Process(c, {}, f"http://127.0.0.1:{h}/v2/health/ready",
                                                                   log)))
    return found


def measure_server(server: Server, run: int, args: argparse.Namespace, logs: Path) -> list[Point]:
    points = []
    try:
        process = server.start(logs / f"{re.sub(r'[^a-z0-9]+', '-', server.name.lower())}-{run}.log")
    except RuntimeError as exc:
        return [Point(server.name, door, c, b, run, error=f"did not start: {str(exc)[:200]}")
                for door in server.doors for c, b in LOADS]
    try:
        for door, url in server.doors.items():
            for concurrency, batch in LOADS:
                point = perf_analyzer(args.perf_analyzer, Point(server.name, door, concurrency, batch, run), url,
                                      args.window_ms, process)
                points.append(point)
                print(f"  run {run} {server.name:55s} {door:9s} c={concurrency:<3d} b={batch}: " + (
                    f"{point.images_per_s:8.0f} img/s  p50 {point.p50_ms:6.2f} ms  p99 {point.p99_ms:6.2f} ms  "
                    f"cores: server {point.server_cores:.2f} client {point.client_cores:.2f}"
                    if point.error is None else f"FAILED: {point.error}"), flush=True)
    finally:
        process.stop()
    return points


def grpc_fresh_starts(args: argparse.Namespace, logs: Path) -> list[Point]:
    """cnnserve restarted ``--grpc-fresh-starts`` times, gRPC at ``--fresh-clients`` clients each time."""
    points = []
    for start in range(args.grpc_fresh_starts):
        process, _, grpc_port = cnnserve({}, logs / f"fresh-{start}.log")
        try:
            point = perf_analyzer(args.perf_analyzer, Point("cnnserve", "grpc", args.fresh_clients, 1, start),
                                  f"127.0.0.1:{grpc_port}", args.window_ms, process)
        finally:
            process.stop()
        points.append(point)
        print(f"  fresh start {start}: " + (f"{point.images_per_s:.0f} img/s" if point.error is None else point.error),
              flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perf-analyzer", type=Path, required=True, help="perf_analyzer binary (tritonclient 2.51)")
    parser.add_argument("--kserve-python", type=Path, help="python of a venv with kserve, onnxruntime, tritonclient")
    parser.add_argument("--mlserver-python", type=Path, help="python of a venv with mlserver, onnxruntime")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of the whole set (server order alternates)")
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--grpc-fresh-starts", type=int, default=10, metavar="N",
                        help="cnnserve gRPC over N fresh starts (0: skip)")
    parser.add_argument("--fresh-clients", type=int, default=16, help="concurrent clients of the fresh starts")
    parser.add_argument("--results-name", default="serving", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="cnnserve-bench-"))
    candidates = servers(args)
    points: list[Point] = []
    for run in range(args.runs):
        points += raw_onnxruntime(run)
        for server in candidates if run % 2 == 0 else candidates[::-1]:
            points += measure_server(server, run, args, logs)
    fresh = grpc_fresh_starts(args, logs)
    command = shlex.join(["python", "-m", "benchmarks.serving", *sys.argv[1:]])
    report = {"command": command, "cores": CORES, "model": MODEL, "model_path": str(model_path().relative_to(ROOT)),
              "window_ms": args.window_ms, "runs": args.runs, "servers": [s.name for s in candidates],
              "points": [asdict(p) for p in points], "grpc_fresh_starts": [asdict(p) for p in fresh]}
    print(write_results(args.results_name, report, render(report)))
    if points:
        plot(report, RESULTS / f"{args.results_name}.png")


def cells(points: list[dict]) -> dict[tuple[str, str, int, int], list[dict]]:
    """Points grouped by (server, door, concurrency, batch), in the order first seen."""
    grouped: dict[tuple[str, str, int, int], list[dict]] = {}
    for p in points:
        grouped.setdefault((p["server"], p["door"], p["concurrency"], p["batch"]), []).append(p)
    return grouped


def summary(runs: list[dict], key: str) -> tuple[float, float, float] | None:
    """(median, min, max) of ``key`` over the runs that measured it."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return (statistics.median(values), min(values), max(values)) if values else None


def _cell(runs: list[dict], key: str, digits: int = 0) -> str:
    s = summary(runs, key)
    failed = sum(r["error"] is not None for r in runs)
    text = "–" if s is None else f"{s[0]:,.{digits}f} ({s[1]:,.{digits}f}–{s[2]:,.{digits}f})"
    return text + (f" **{failed} failed**" if failed else "")


def render(report: dict) -> str:
    grouped = cells(report["points"])
    lines = ["# Serving benchmark: cnnserve and its peers", "",
             f"`{report['command']}` — model `{report['model_path']}`, {report['cores']} cores shared by the client "
             f"(perf_analyzer) and the server; each point = 3 fixed windows of {report['window_ms']} ms; "
             f"{report['runs']} runs of the whole set, server order reversed on every other run. Cells: median "
             "(min–max) over runs; a failed point is marked, never dropped. Cores: CPU seconds per second used by "
             "the server's processes / by perf_analyzer during the point.", "",
             "| server | door | clients | images/request | images/s | p50 ms | p99 ms | server cores | "
             "client cores |", "|---|---|---|---|---|---|---|---|---|"]
    for (server, door, concurrency, batch), runs in grouped.items():
        lines.append(f"| {server} | {door} | {concurrency} | {batch} | {_cell(runs, 'images_per_s')} | "
                     f"{_cell(runs, 'p50_ms', 2)} | {_cell(runs, 'p99_ms', 2)} | {_cell(runs, 'server_cores', 2)} | "
                     f"{_cell(runs, 'client_cores', 2)} |")
    errors = sorted({f"{p['server']} {p['door']} c={p['concurrency']} b={p['batch']}: {p['error']}"
                     for p in report["points"] if p["error"]})
    if errors:
        lines += ["", "Failed points:", ""] + [f"- {e}" for e in errors]
    lines += ["", "## cnnserve against the best peer per load", "",
              "| load | cnnserve door | cnnserve median (worst run) | best peer (median) | ratio median / worst |",
              "|---|---|---|---|---|"]
    for concurrency, batch in LOADS:
        for door in ("http", "grpc"):
            ours = summary(grouped.get(("cnnserve", door, concurrency, batch), []), "images_per_s")
            peers = [(s, d, summary(runs, "images_per_s")) for (s, d, c, b), runs in grouped.items()
                     if s not in ("cnnserve", "onnxruntime in-process") and c == concurrency and b == batch]
            peers = [(s, d, v) for s, d, v in peers if v]
            if not ours or not peers:
                continue
            best = max(peers, key=lambda x: x[2][0])
            lines.append(f"| {concurrency} clients × {batch} image{'s' * (batch > 1)} | {door} | {ours[0]:,.0f} "
                         f"({ours[1]:,.0f}) | {best[0]} {best[1]}: {best[2][0]:,.0f} | {ours[0] / best[2][0]:.2f} / "
                         f"{ours[1] / best[2][0]:.2f} |")
    starts = report["grpc_fresh_starts"]
    if starts:
        values = [p["images_per_s"] for p in starts if p["images_per_s"] is not None]
        failed = [p["error"] for p in starts if p["error"]]
        summary_line = "no start measured" if not values else (
            f"images/s: median {statistics.median(values):,.0f}, min {min(values):,.0f}, max {max(values):,.0f}; "
            f"each start in order: {', '.join(f'{v:,.0f}' for v in values)}")
        lines += ["", f"## cnnserve gRPC, {starts[0]['concurrency']} clients, over {len(starts)} fresh starts", "",
                  summary_line, "", f"{len(failed)} failed: {'; '.join(failed)}" if failed else "none failed"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_p99) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[str, list[tuple[int, tuple, tuple]]] = {}
    for (server, door, concurrency, batch), runs in cells(report["points"]).items():
        tp, p99 = summary(runs, "images_per_s"), summary(runs, "p99_ms")
        if batch == 1 and server != "onnxruntime in-process" and tp and p99:
            series.setdefault(f"{server} / {door}", []).append((concurrency, tp, p99))
    for label, values in sorted(series.items()):
        values.sort()
        xs = [v[0] for v in values]
        style = "o-" if label.startswith("cnnserve") else "s--"
        for ax, index in ((ax_tp, 1), (ax_p99, 2)):
            med = [v[index][0] for v in values]
            err = [[m - v[index][1] for m, v in zip(med, values, strict=True)],
                   [v[index][2] - m for m, v in zip(med, values, strict=True)]]
            ax.errorbar(xs, med, yerr=err, fmt=style, capsize=3, label=label)
    for ax, title in ((ax_tp, "throughput (images/s)"), (ax_p99, "p99 latency (ms)")):
        ax.set(xscale="log", xlabel="concurrent clients (1 image per request)", title=f"{MODEL}: {title}")
        ax.set_xticks([1, 16, 64], ["1", "16", "64"])
        ax.grid(alpha=0.3)
    ax_p99.set_yscale("log")
    ax_tp.legend(fontsize=6.5)
    fig.suptitle("median over runs, bars: min–max; client and server share the cores", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:], dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
