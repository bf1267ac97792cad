"""Start the real service (``bentoml serve``: HTTP + in-process gRPC) on 127.0.0.1 for tests."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAX_IMAGES = 160  # the test server's per-request image limit: above the cards' batch of 64, so requests split
MAX_BYTES = 4 * 1024 * 1024  # and body limit
HEADER_TIMEOUT_S = 1.5  # and header-read timeout: short, so that the slowloris test is quick


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this test run: the kernel may offer the same one twice in a row,
    and a server's gRPC and probe ports, both bound with SO_REUSEPORT, then shared it without an error (a gRPC health
    check reached the probe process in CI)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def worker_pids(self) -> set[int]:
        import psutil

        return {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_server(model_dir: Path, log: Path, wait_ready: bool = True, **settings: str) -> Server:
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "CNNSERVE_MODEL_DIR": str(model_dir), "CNNSERVE_GRPC_PORT": str(grpc_port),
           "CNNSERVE_GRPC_HOST": "127.0.0.1", "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(ROOT)}
    # its own BentoML home: a server starting clears the Prometheus files of every server sharing one
    env["BENTOML_HOME"] = str(log.parent / f"bentoml-{http_port}")
    env["CNNSERVE_SHUTDOWN_DRAIN_S"] = "0"  # tests stop servers often; test_overload checks the drain itself
    # no shedding on event-loop lag: tests that expect every answer must not see 503s on a slow machine;
    # test_overload checks shedding itself
    env["CNNSERVE_MAX_LOOP_LAG_MS"] = "0"
    env.update({f"CNNSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:CnnServe", "--host", "127.0.0.1",
           "--port", str(http_port), "--timeout-keep-alive", "75", "--timeout-graceful-shutdown", "20"]
    out = open(log, "wb")  # noqa: SIM115 - the server writes it for its whole life
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, http_port, grpc_port, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            r = httpx.get(f"{server.url}/livez", timeout=1)
            if r.status_code == 200 and (not wait_ready or httpx.get(f"{server.url}/readyz", timeout=1).status_code
                                         == 200):
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{log.read_text()[-4000:]}")


def png(array: np.ndarray, size: tuple[int, int] | None = None, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    if size:
        image = image.resize(size)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
