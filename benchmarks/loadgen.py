"""Load for the overload and soak benchmarks: the service started as users start it, and requests sent on a
fixed schedule (open loop) or by a fixed number of clients (closed loop) over OIP REST (binary or JSON
tensors) and gRPC.

Open loop means request ``i`` is due at ``start + i / rate`` whatever the server is doing, and its latency
counts from that moment (no coordinated omission): a server that falls behind sees the queue it would see
in production. Both generators (``HttpLoad``, ``GrpcLoad``) keep no task, future or timer per request, so that
one Python process can offer several thousand requests/s on time, and the benchmarks run them with the
garbage collector paused (``collector_paused``); they run on the same cores as the server (say so in reports).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import grpc
import httpx
import numpy as np
import psutil
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from benchmarks.serving import Process, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mnist-cnn"
TIMEOUT_S = 10.0
CONTENT_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")  # not Inference-Header-Content-Length


@dataclass
class Sample:
    door: str
    due: float  # when the request was due (loop time)
    latency_s: float
    outcome: str  # ok | rejected (503 / 429 / UNAVAILABLE / RESOURCE_EXHAUSTED) | error
    sent_late_s: float = 0.0  # how long after it was due it went out: the generator's own lag (open loop)
    reason: str = ""  # a refusal's mechanism, from its message (``refusal_reason``)


@dataclass
class Service:
    """``bentoml serve`` of this repository's service, as ``make serve`` starts it, with the probe port on as the
    Kubernetes manifests set it (``CNNSERVE_HEALTH_PORT``)."""

    http_port: int
    grpc_port: int
    health_port: int
    server: Process

    @classmethod
    def start(cls, log: Path, **settings: str) -> Service:
        http_port, grpc_port, health_port = free_port(), free_port(), free_port()
        env = {"CNNSERVE_MODEL_DIR": str(ROOT / "exports"), "CNNSERVE_GRPC_PORT": str(grpc_port),
               "CNNSERVE_HEALTH_PORT": str(health_port),
               "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(log.parent / "bentoml"),
               **{f"CNNSERVE_{k.upper()}": str(v) for k, v in settings.items()}}
        cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:CnnServe", "--host", "127.0.0.1",
               "--port", str(http_port), "--timeout-keep-alive", "75", "--timeout-graceful-shutdown", "20"]
        return cls(http_port, grpc_port, health_port, Process(cmd, env, f"http://127.0.0.1:{http_port}/readyz", log))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def worker_rss_mb(self) -> float:
        """Resident memory of the worker processes together (MB)."""
        children = psutil.Process(self.server.proc.pid).children(recursive=True)
        return sum(p.memory_info().rss for p in children if p.is_running()) / 2**20

    def stop(self) -> None:
        self.server.stop()


def sample_images(n: int = 1) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def http_request(port: int, binary: bool, images: np.ndarray, path: str | None = None) -> bytes:
    """One pre-encoded OIP infer request (HTTP/1.1, keep-alive)."""
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "UINT8"}
    if binary:
        tensor["parameters"] = {"binary_data_size": images.size}
        header = json.dumps({"inputs": [tensor], "outputs": [{"name": "probs",
                                                               "parameters": {"binary_data": True}}]}).encode()
        body, extra = header + images.tobytes(), f"Inference-Header-Content-Length: {len(header)}\r\n"
        content_type = "application/octet-stream"
    else:
        tensor["data"] = images.ravel().tolist()
        body, extra, content_type = json.dumps({"inputs": [tensor]}).encode(), "", "application/json"
    path = path or f"/v2/models/{MODEL}/infer"
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def http_outcome(status: int) -> str:
    return "ok" if status == 200 else "rejected" if status in (429, 503) else f"http {status}"


REFUSALS = {"event loop is": "loop lag", "estimated queue wait": "queue estimate", "images are queued": "queue bound",
            "in the queue, the limit": "queue wait", "Concurrent RPC limit": "concurrency",
            "Too many requests": "concurrency"}


def refusal_reason(message: str) -> str:
    """Which of the service's mechanisms refused a request, from the message it sent (see serving/README.md)."""
    return next((reason for text, reason in REFUSALS.items() if text in message), "other")


class _Connection(asyncio.Protocol):
    """One keep-alive connection of ``HttpLoad``: one request at a time, the answer read from its Content-Length."""

    def __init__(self, load: HttpLoad) -> None:
        self.load, self.transport, self.buffer = load, None, bytearray()
        self.due: float | None = None  # when the request in flight was due; None: idle
        self.sent = 0.0  # when it went out

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.load.connected(self)

    def data_received(self, data: bytes) -> None:
        if self.due is None:  # nothing in flight (e.g. a request given up on): not an answer to count
            self.buffer.clear()
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = CONTENT_LENGTH.search(self.buffer, 0, end)
        if length:
            size = end + 4 + int(length.group(1))
        else:  # chunked: up to the last, empty chunk
            size = self.buffer.find(b"\r\n0\r\n\r\n", end) + 7
            if size < 7:
                return
        if len(self.buffer) < size:
            return
        head = bytes(self.buffer[:end]).lower()
        status = int(head[9:12])
        reason = refusal_reason(self.buffer[end + 4:size].decode(errors="replace")) if status != 200 else ""
        del self.buffer[:size]
        self.load.answered(self, status, b"connection: close" in head, reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)


class HttpLoad:
    """HTTP load without a task, future or timer per request, so that one process can offer several thousand
    requests/s and still send each when it is due: requests go out on at most ``connections`` keep-alive
    connections (as wrk2 keeps a fixed set), one at a time each; a request due while all are busy waits for
    the next free one, and its latency counts from when it was due. Open loop: ``rate`` requests/s for
    ``seconds``; closed loop: each connection sends its next request when the last one is answered."""

    def __init__(self, port: int, request: bytes, name: str, connections: int) -> None:
        self.port, self.request, self.name, self.connections = port, request, name, connections
        self.samples: list[Sample] = []
        self.backlog: collections.deque[float] = collections.deque()  # due times of requests not sent yet
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()
        self.opened = 0  # connections open or opening
        self.closed_loop_until: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the running loop, from the start of the load

    async def open_loop(self, rate: float, seconds: float) -> list[Sample]:
        self.loop = asyncio.get_running_loop()
        start, total, issued = self.loop.time(), int(rate * seconds), 0
        while issued < total:
            now = self.loop.time()
            due = min(total, int((now - start) * rate) + 1)
            self.backlog.extend(start + i / rate for i in range(issued, due))
            issued = due
            self._dispatch()
            self._expire(now)
            await asyncio.sleep(max(0.0, min(0.001, start + issued / rate - self.loop.time())))
        return await self._finish()

    async def closed_loop(self, seconds: float) -> list[Sample]:
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.closed_loop_until = now + seconds
        self.backlog.extend([now] * self.connections)
        self._dispatch()
        while self.loop.time() < self.closed_loop_until:
            self._expire(self.loop.time())
            await asyncio.sleep(0.05)
        return await self._finish()

    async def _finish(self) -> list[Sample]:
        while self.backlog or self.busy:
            self._expire(self.loop.time())
            await asyncio.sleep(0.01)
        for connection in self.idle:
            connection.transport.close()
        return self.samples

    def _dispatch(self) -> None:
        while self.backlog and self.idle:
            connection = self.idle.pop()
            connection.due, connection.sent = self.backlog.popleft(), self.loop.time()
            self.busy.add(connection)
            connection.transport.write(self.request)
        while self.backlog and self.opened < min(self.connections, len(self.backlog) + len(self.busy)):
            self.opened += 1
            self.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            await self.loop.create_connection(lambda: _Connection(self), "127.0.0.1", self.port)
        except OSError:
            self.opened -= 1
            if self.backlog:  # the request it was for fails; the rest try again
                self._record(self.backlog.popleft(), "error OSError")
                self._dispatch()

    def _record(self, due: float, outcome: str, sent: float | None = None, reason: str = "") -> None:
        now = self.loop.time()
        self.samples.append(Sample(self.name, due, now - due, outcome, (now if sent is None else sent) - due, reason))

    def connected(self, connection: _Connection) -> None:
        self.idle.append(connection)
        self._dispatch()

    def answered(self, connection: _Connection, status: int, close: bool, reason: str = "") -> None:
        self._record(connection.due, http_outcome(status), connection.sent, reason)
        self.busy.discard(connection)
        connection.due = None
        if self.closed_loop_until is not None and self.loop.time() < self.closed_loop_until:
            self.backlog.append(self.loop.time())
        if close:
            connection.transport.close()
        else:
            self.idle.append(connection)
        self._dispatch()

    def lost(self, connection: _Connection) -> None:
        self.opened -= 1
        if connection.due is not None:
            self._record(connection.due, "error connection lost", connection.sent)
            self.busy.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        self._dispatch()

    def _expire(self, now: float) -> None:
        """Requests not answered ``TIMEOUT_S`` after they were due: errors (their connections are closed)."""
        while self.backlog and self.backlog[0] + TIMEOUT_S < now:
            self._record(self.backlog.popleft(), "error timeout")
        for connection in [c for c in self.busy if c.due + TIMEOUT_S < now]:
            self._record(connection.due, "error timeout", connection.sent)
            self.busy.discard(connection)
            connection.due = None
            connection.transport.close()


class GrpcLoad:
    """gRPC ModelInfer load from grpcio's synchronous stubs' futures (the calls run in grpcio's C core; a callback
    records each answer), light enough for one process to offer several thousand calls/s, spread over a few
    channels as clients with several connections do. Open loop: ``rate`` calls/s for ``seconds``, each sent when
    due; closed loop: ``clients`` calls in flight, each answer followed by the next call. Blocking: run it in a
    thread or process of its own."""

    def __init__(self, port: int, images: np.ndarray, channels: int = 4) -> None:
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
        self.calls = [pb_grpc.GRPCInferenceServiceStub(c).ModelInfer for c in self.channels]
        tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(images.shape))
        self.request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[images.tobytes()])
        self.samples: list[Sample] = []
        self.sent, self.in_flight = 0, 0
        self.lock = threading.Condition()
        self.closed_loop_until: float | None = None

    def _send(self, due: float) -> None:
        with self.lock:
            call = self.calls[self.sent % len(self.calls)]
            self.sent += 1
            self.in_flight += 1
        sent = time.monotonic()
        call.future(self.request, timeout=TIMEOUT_S).add_done_callback(lambda f: self._answered(f, due, sent))

    def _answered(self, future: grpc.Future, due: float, sent: float) -> None:
        now = time.monotonic()
        error = future.exception()
        code = error.code() if error is not None else grpc.StatusCode.OK
        outcome = "ok" if code == grpc.StatusCode.OK else "rejected" if code in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED) else f"grpc {code.name}"
        reason = refusal_reason(error.details() or "") if outcome == "rejected" else ""
        with self.lock:
            self.samples.append(Sample("grpc", due, now - due, outcome, sent - due, reason))
            self.in_flight -= 1
            self.lock.notify_all()
        if self.closed_loop_until is not None and now < self.closed_loop_until:
            self._send(now)

    def open_loop(self, rate: float, seconds: float) -> list[Sample]:
        start, total, issued = time.monotonic(), int(rate * seconds), 0
        while issued < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            for i in range(issued, due):
                self._send(start + i / rate)
            issued = due
            time.sleep(max(0.0, min(0.001, start + issued / rate - time.monotonic())))
        return self._finish()

    def closed_loop(self, clients: int, seconds: float) -> list[Sample]:
        self.closed_loop_until = time.monotonic() + seconds
        for _ in range(clients):
            self._send(time.monotonic())
        time.sleep(seconds)
        return self._finish()

    def _finish(self) -> list[Sample]:
        with self.lock:
            self.lock.wait_for(lambda: self.in_flight == 0, timeout=2 * TIMEOUT_S)
        for channel in self.channels:
            channel.close()
        return list(self.samples)


NATIVE_SOURCE = ROOT / "benchmarks" / "native" / "openloop.c"
NATIVE_BINARY = ROOT / "benchmarks" / "native" / "build" / "openloop"
GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
REFUSED_GRPC = {grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
GRPC_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def native_generator() -> Path:
    """``benchmarks/native/openloop``, built with the C compiler if missing or older than its source (it needs
    libnghttp2: ``apt-get install gcc libnghttp2-dev``)."""
    if NATIVE_BINARY.exists() and NATIVE_BINARY.stat().st_mtime >= NATIVE_SOURCE.stat().st_mtime:
        return NATIVE_BINARY
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("the native load generator needs a C compiler (apt-get install gcc libnghttp2-dev), "
                           "or run with --generator python")
    NATIVE_BINARY.parent.mkdir(parents=True, exist_ok=True)
    built = NATIVE_BINARY.with_suffix(".tmp")
    result = subprocess.run([compiler, "-O2", "-o", str(built), str(NATIVE_SOURCE), "-lnghttp2"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building {NATIVE_SOURCE.name} failed (it needs libnghttp2-dev: apt-get install "
                           f"libnghttp2-dev), or run with --generator python:\n{result.stderr[-2000:]}")
    built.replace(NATIVE_BINARY)
    return NATIVE_BINARY


class NativeLoad:
    """Open-loop load from ``benchmarks/native/openloop.c``: the same schedule and rules as ``HttpLoad`` (HTTP/1.1
    keep-alive connections, one request at a time each) and ``GrpcLoad`` (unary calls spread over ``connections``
    HTTP/2 connections), at a few microseconds of CPU per request instead of 30 (HTTP) or 140 (gRPC): on cores
    shared with the server, a Python generator at twice the capacity takes a share the server then lacks, and
    falls behind on gRPC. Blocking: run it in a thread or process of its own."""

    def __init__(self, door: str, port: int, images: np.ndarray, connections: int, binary: bool = True) -> None:
        self.door, self.port, self.connections = door, port, connections
        if door == "grpc":
            tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(images.shape))
            self.request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor],
                                                raw_input_contents=[images.tobytes()]).SerializeToString()
        else:
            self.request = http_request(port, binary, images)
        self.cpu_s = 0.0  # the generator's CPU seconds in the last run

    def open_loop(self, rate: float, seconds: float) -> list[Sample]:
        return native_samples(self.door, self.open_loop_output(rate, seconds))

    def open_loop_output(self, rate: float, seconds: float) -> str:
        """``open_loop``'s samples as the generator wrote them (``native_samples`` reads them): a process that
        measures something else meanwhile can put off the parse (1-2 s of a core after a 30 s burst)."""
        return self._run(repr(rate), seconds)

    def closed_loop(self, clients: int, seconds: float) -> list[Sample]:
        """``clients`` requests out at any time (HTTP: on that many connections), each answer followed at once by
        the next request."""
        return native_samples(self.door, self._run(f"closed:{clients}", seconds))

    def _run(self, rate: str, seconds: float) -> str:
        binary = native_generator()
        with tempfile.NamedTemporaryFile(suffix=".bin") as request:
            request.write(self.request)
            request.flush()
            cmd = [str(binary), self.door, "127.0.0.1", str(self.port), rate, repr(seconds),
                   str(self.connections), request.name] + ([GRPC_INFER_PATH] if self.door == "grpc" else [])
            with tempfile.TemporaryFile() as errors:
                process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
                output = process.stdout.read()
                process.stdout.close()
                # its own CPU (RUSAGE_CHILDREN would add every child of this process that ended meanwhile,
                # other doors' generators running beside this one included)
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                if process.returncode:
                    errors.seek(0)
                    raise subprocess.CalledProcessError(process.returncode, cmd, output, errors.read())
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return output


def native_samples(door: str, output: str) -> list[Sample]:
    """The samples in the native generator's output (a line per request: due, sent, done, status, message)."""
    return [_native_sample(door, line) for line in output.splitlines()]


def _native_sample(door: str, line: str) -> Sample:
    due, sent, done, code, message = line.split("\t", 4)
    due_s, code_n = float(due), int(code)
    if code_n < 0:
        outcome = f"error {message}"
    elif door == "grpc":
        outcome = "ok" if code_n == 0 else "rejected" if code_n in REFUSED_GRPC else f"grpc {GRPC_NAMES[code_n]}"
    else:
        outcome = http_outcome(code_n)
    reason = refusal_reason(unquote(message)) if outcome == "rejected" else ""
    return Sample(door, due_s, float(done) - due_s, outcome, float(sent) - due_s, reason)


async def probe(url: str, period_s: float, seconds: float) -> list[float]:
    """Latencies (s) of ``GET url`` every ``period_s`` on its own connection; a failure counts as 3 s."""
    loop = asyncio.get_running_loop()
    latencies = []
    async with httpx.AsyncClient(timeout=3) as client:
        stop = loop.time() + seconds
        while loop.time() < stop:
            t0 = loop.time()
            try:
                await client.get(url)
                latencies.append(loop.time() - t0)
            except httpx.HTTPError:
                latencies.append(3.0)
            await asyncio.sleep(max(0.0, period_s - (loop.time() - t0)))
    return latencies


def command(module: str) -> str:
    """This run's command line (``python -m module`` and its arguments), with the service settings it set in
    the environment."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("CNNSERVE_")]
    return shlex.join([*settings, "python", "-m", module, *sys.argv[1:]])


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a load runs (after one collection on entry, so that each
    phase starts clean). The generators make no reference cycles per request, but each sample they keep is a
    tracked object, and the collector's full passes walk them all: a minute into a soak they stopped the
    generator for up to 320 ms at a time, and the requests due meanwhile went out late, as one burst that the
    server was charged for (refusals, p99)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 2) if values else None
