"""Load for the overload and soak benchmarks: the service started as users start it, and requests sent on a
fixed schedule (open loop) or by a fixed number of clients (closed loop) over OIP REST (binary or JSON
tensors) and gRPC.

Open loop means request ``i`` is due at ``start + i / rate`` whatever the server is doing, and its latency
counts from that moment (no coordinated omission): a server that falls behind sees the queue it would see
in production. Each HTTP request goes out on a free keep-alive connection, or a new one when all are busy.
The generator runs in this process on the same cores as the server (say so in reports).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

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
STATUS = re.compile(rb"HTTP/1\.1 (\d{3})")
CONTENT_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")  # not Inference-Header-Content-Length


@dataclass
class Sample:
    door: str
    due: float  # when the request was due (loop time)
    latency_s: float
    outcome: str  # ok | rejected (503 / 429 / UNAVAILABLE / RESOURCE_EXHAUSTED) | error


@dataclass
class Service:
    """``bentoml serve`` of this repository's service, as ``make serve`` starts it."""

    http_port: int
    grpc_port: int
    server: Process

    @classmethod
    def start(cls, log: Path, **settings: str) -> Service:
        http_port, grpc_port = free_port(), free_port()
        env = {"CNNSERVE_MODEL_DIR": str(ROOT / "exports"), "CNNSERVE_GRPC_PORT": str(grpc_port),
               "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(log.parent / "bentoml"),
               **{f"CNNSERVE_{k.upper()}": str(v) for k, v in settings.items()}}
        cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:CnnServe", "--host", "127.0.0.1",
               "--port", str(http_port), "--timeout-keep-alive", "75", "--timeout-graceful-shutdown", "20"]
        return cls(http_port, grpc_port, Process(cmd, env, f"http://127.0.0.1:{http_port}/readyz", log))

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


class HttpDoor:
    """Requests over a pool of keep-alive connections, one request per connection at a time. With
    ``connections`` set, at most that many are open and a request due while all are busy waits for one (as
    wrk2 does; its latency still counts from when it was due); without it, a new one is opened."""

    def __init__(self, port: int, request: bytes, name: str, connections: int | None = None) -> None:
        self.port, self.request, self.name, self.connections = port, request, name, connections
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open = 0
        self.waiting: collections.deque[asyncio.Future] = collections.deque()

    async def _acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while not self.idle and self.connections is not None and self.open >= self.connections:
            waiter = asyncio.get_running_loop().create_future()
            self.waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:  # the caller's timeout: pass on a wake-up it got, or stop waiting
                if waiter.done() and not waiter.cancelled():
                    self._wake()
                elif waiter in self.waiting:
                    self.waiting.remove(waiter)
                raise
        if self.idle:
            return self.idle.pop()
        self.open += 1
        try:
            return await asyncio.open_connection("127.0.0.1", self.port)
        except Exception:
            self._closed()
            raise

    def _closed(self) -> None:
        self.open -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def __call__(self) -> str:
        conn = await self._acquire()
        reader, writer = conn
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(CONTENT_LENGTH.search(head).group(1))
            await reader.readexactly(length)
        except BaseException:  # an error, or the caller's timeout: the connection is in an unknown state
            writer.close()
            self._closed()
            raise
        if b"connection: close" in head.lower():
            writer.close()
            self._closed()
        else:
            self.idle.append(conn)
            self._wake()
        status = int(STATUS.match(head).group(1))
        return "ok" if status == 200 else "rejected" if status in (429, 503) else f"http {status}"

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


class GrpcDoor:
    """ModelInfer calls spread over a few channels (as clients with several connections do)."""

    def __init__(self, port: int, images: np.ndarray, channels: int = 4) -> None:
        self.name = "grpc"
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
        self.stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(images.shape))
        self.request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[images.tobytes()])
        self.next = 0

    async def __call__(self) -> str:
        self.next = (self.next + 1) % len(self.stubs)
        try:
            await self.stubs[self.next].ModelInfer(self.request, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                return "rejected"
            return f"grpc {code.name}"
        return "ok"

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def timed(door, due: float, samples: list[Sample]) -> None:
    loop = asyncio.get_running_loop()
    try:
        outcome = await asyncio.wait_for(door(), TIMEOUT_S)
    except Exception as exc:  # a timeout or a broken connection: the client saw an error
        outcome = f"error {type(exc).__name__}"
    samples.append(Sample(door.name, due, loop.time() - due, outcome))


async def open_loop(door, rate: float, seconds: float) -> list[Sample]:
    """Send ``rate`` requests per second for ``seconds``, each when due; wait for all of them."""
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    tasks = set()
    start, sent, total = loop.time(), 0, int(rate * seconds)
    while sent < total:
        now = loop.time()
        due_count = min(total, int((now - start) * rate) + 1)
        for i in range(sent, due_count):
            task = loop.create_task(timed(door, start + i / rate, samples))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent = due_count
        await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
    if tasks:
        await asyncio.wait(tasks)
    return samples


async def closed_loop(door, clients: int, seconds: float) -> list[Sample]:
    """``clients`` clients, each sending its next request when the last one is answered."""
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    stop = loop.time() + seconds

    async def client() -> None:
        while loop.time() < stop:
            await timed(door, loop.time(), samples)

    await asyncio.gather(*(client() for _ in range(clients)))
    return samples


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


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 2) if values else None
