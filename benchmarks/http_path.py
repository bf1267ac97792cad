"""In-process CPU cost of the HTTP door's inference path, without sockets and without the model: uvicorn's
httptools protocol with the service's header-time steps (``serving.uvicorn_hooks.install_*``: load shedding, the infer
lane, the header timeout, single-write responses), the OIP infer endpoint, the dataplane and the batcher, with
onnxruntime replaced by a constant answer. ``--connections`` fake connections each send the next binary
single-image request as soon as the previous answer is written, as closed-loop clients do.

    python -m benchmarks.http_path [--requests 30000] [--connections 16] [--rounds 3]

What it measures is the Python the path runs per request (what a change to the door's code moves); the
kernel's socket work, the client and onnxruntime (222 µs an image for mnist-cnn on one thread) come on top in
the real server. Writes benchmarks/results/http_path.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import numpy as np
import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from benchmarks.loadgen import command
from benchmarks.publish import write_results
from serving.dataplane import DataPlane
from serving.oip_rest import check_admission, create_app, infer_lane
from serving.repository import ModelRepository
from serving.settings import Settings
from serving.uvicorn_hooks import install_load_shedding, install_read_limits, install_single_write_responses

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 2000


def infer_request(model: str = "mnist-cnn") -> bytes:
    """A keep-alive OIP REST binary request for one 28x28 image."""
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + 784}\r\n\r\n"
            ).encode() + header + bytes(784)


class Transport:
    """The few transport methods uvicorn's protocol calls; ``written`` gets every write."""

    def __init__(self, written: Callable[[bytes], None]) -> None:
        self.write, self.closing = written, False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(requests: int, connections: int) -> float:
    """Seconds of this process's CPU per request over ``requests`` answers (after a warm-up)."""
    settings = Settings.from_env({"CNNSERVE_MODEL_DIR": str(ROOT / "exports"), "CNNSERVE_WORKERS": "1"})
    repository = ModelRepository(settings)
    repository.scan()
    dataplane = DataPlane(repository, settings, None)
    for model in repository.all_loaded():  # the model's work is not what this measures
        model.batcher._run = lambda images: np.zeros((len(images), 10), np.float32)
        model.batcher._run_wide = None
    app = create_app(lambda: dataplane)
    install_single_write_responses()
    install_read_limits(settings.header_timeout_s, settings.max_header_bytes)
    install_load_shedding(lambda target: check_admission(dataplane, target), settings.max_concurrency,
                          infer_lane(app.state.infer_endpoint, settings.request_timeout_s))
    config = Config(app=app, http="httptools", log_level="warning")
    config.load()
    state, request = ServerState(), infer_request()
    loop = asyncio.get_running_loop()

    async def answer(count: int) -> None:
        left, done = [count], loop.create_future()

        def connection() -> HttpToolsProtocol:
            protocol = HttpToolsProtocol(config, state, {})

            def written(data: bytes) -> None:
                if not data.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"not answered: {data[:300]!r}")
                left[0] -= 1
                if left[0] <= 0:
                    if not done.done():
                        done.set_result(None)
                    return
                loop.call_soon(protocol.data_received, request)

            protocol.connection_made(Transport(written))
            return protocol

        protocols = [connection() for _ in range(connections)]
        for protocol in protocols:
            protocol.data_received(request)
        await done
        for protocol in protocols:
            protocol.transport.close()

    await answer(WARM_UP)
    cpu = time.process_time()
    await answer(requests)
    return (time.process_time() - cpu) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="runs, each in a fresh process; the median is reported")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(1e6 * uvloop.run(run(args.requests, args.connections)))
        return
    runs = []
    with tempfile.TemporaryDirectory() as metrics_dir:  # multi-process metrics, as in the workers
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        for _ in range(args.rounds):
            child = [sys.executable, "-m", "benchmarks.http_path", "--child", "--requests", str(args.requests),
                     "--connections", str(args.connections)]
            out = subprocess.run(child, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            runs.append(float(out.stdout.split()[-1]))
    lines = [f"# In-process cost of the HTTP inference path (`{command('benchmarks.http_path')}`)", "",
             f"uvicorn's protocol, the header-time steps, the infer lane and endpoint, the dataplane and the batcher, "
             f"onnxruntime replaced by a constant; {args.connections} connections, {args.requests:,} binary "
             "single-image requests per run after a warm-up; no sockets; each run a fresh process.", "",
             f"- CPU per request: median {median(runs):.1f} µs (runs: {', '.join(f'{r:.1f}' for r in runs)})"]
    print(write_results("http_path", {"command": command("benchmarks.http_path"), "us_per_request": runs,
                                      "requests": args.requests, "connections": args.connections},
                        "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
