"""Health probes answered from a thread of their own, on a port of their own (``CNNSERVE_HEALTH_PORT``).

On the HTTP port a probe waits for the worker's event loop like any request: the new connection's accept, its
read and its answer each take a turn of the loop, and under overload a turn takes tens of milliseconds (a
kubelet-like probe, a new connection per GET, measured ``/readyz`` there at p99 40 ms against 4.5 ms for a
thread server in a process of its own, in the same open-loop burst: serving/README.md). Here a small threaded
HTTP server in each worker answers from what the worker already knows, without the event loop: the thread needs
only the GIL, which the loop hands over at least every switch interval (5 ms) and whenever onnxruntime runs.

- ``GET /readyz`` (and ``/v2/health/ready``): 200 ``{"ready": true}`` when the worker serves (``ready()``: the
  first scan is done, a model serves, strict readiness if set, not draining at shutdown), else 503 with the body
  ``readiness()`` gives (the versions that are not ready and why).
- ``GET /livez`` (and ``/v2/health/live``): 200 while every worker's event loop runs. Each worker's loop stamps a
  heartbeat every ``HEARTBEAT_S`` into its slot of a small file all workers map (``serving.shared_slots``); when
  any worker's is older than ``stall_s`` that loop is stuck (a deadlock, a callback that never returns), and the
  answer is 503 naming it, whichever worker the probe reached, so that the liveness probe restarts the pod. A busy
  loop still beats: an overloaded worker is not restarted for being busy, which a liveness probe that queued
  behind inference on the HTTP port could do (it timed out there under overload). A worker that has not started
  its heartbeat yet, or has stopped it on its way out, is not judged.

Every worker binds the port with ``SO_REUSEPORT``, as the gRPC port is shared: a probe reaches one worker, as
it does on the HTTP port. Each answer ends its connection (kubelet opens one per probe), so a client cannot hold
one of the server's threads between probes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from serving.shared_slots import map_slots

log = logging.getLogger("cnnserve.health")
HEARTBEAT_S = 0.5  # how often the event loop stamps its heartbeat
READ_TIMEOUT_S = 2.0  # a probe connection that sends nothing for this long is closed
READY_PATHS = {"/readyz", "/v2/health/ready"}
LIVE_PATHS = {"/livez", "/v2/health/live"}
BEAT = struct.Struct("d")  # a worker's slot: time.monotonic() of its loop's last heartbeat, 0 = not judged


class _Server(ThreadingHTTPServer):
    allow_reuse_port = True  # every worker binds the same port
    daemon_threads = True


class HealthServer:
    """The probe port of one worker: ``start`` on its event loop, ``stop`` at shutdown."""

    def __init__(self, host: str, port: int, readiness: Callable[[], dict[str, Any]], beats: Path,
                 workers: int = 1, slot: int = 0, stall_s: float = 10.0) -> None:
        """``beats``: the heartbeat file the server's ``workers`` share; ``slot``: this worker's place in it."""
        self.host, self.port, self.stall_s = host, port, stall_s
        self._readiness = readiness
        self._beats, self._workers, self._slot = map_slots(beats, workers, slot, BEAT.size), workers, slot
        # not judged until it beats: a respawned worker's predecessor (killed, crashed) left its last beat here,
        # which would age past stall_s while this one loads its models
        BEAT.pack_into(self._beats, slot * BEAT.size, 0.0)
        self._timer: asyncio.TimerHandle | None = None
        self._server: _Server | None = None

    def start(self) -> None:
        """Bind the port, answer probes from a daemon thread, and start the heartbeat on the running loop."""
        try:
            self._server = _Server((self.host, self.port), _handler(self))
        except OSError as exc:
            raise RuntimeError(f"CNNSERVE_HEALTH_PORT: cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                               "free the port, choose another, or set 0 to turn the probe port off") from exc
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="cnnserve-health", daemon=True).start()
        self._heartbeat()
        log.info("health probes on http://%s:%d (/readyz, /livez)", self.host, self.port)

    async def stop(self) -> None:
        """Stop the heartbeat and the server (its thread polls for the stop every half second: waited for off the
        event loop)."""
        if self._timer is not None:
            self._timer.cancel()
            BEAT.pack_into(self._beats, self._slot * BEAT.size, 0.0)  # on its way out: not judged
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()

    def _heartbeat(self) -> None:
        BEAT.pack_into(self._beats, self._slot * BEAT.size, time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(HEARTBEAT_S, self._heartbeat)

    def ready(self) -> tuple[int, dict[str, Any]]:
        return readiness_answer(self._readiness())

    def live(self) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        for worker in range(self._workers):
            beat = BEAT.unpack_from(self._beats, worker * BEAT.size)[0]
            if beat and now - beat > self.stall_s:
                return 503, {"live": False, "error": f"worker {worker + 1}: its event loop has not run for "
                                                     f"{now - beat:.1f} s (the limit is {self.stall_s:g} s)"}
        return 200, {"live": True}


def readiness_answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The status of a readiness probe's answer with ``body`` (``DataPlane.readiness()``): 200 when ready, else 503."""
    return (200 if body.get("ready") else 503), body


def _handler(health: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT_S

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in READY_PATHS:
                status, body = _safely(health.ready)
            elif path in LIVE_PATHS:
                status, body = health.live()
            else:
                status, body = 404, {"error": f"no route {path}: this port answers /readyz and /livez"}
            self._answer(status, body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a probe every few seconds per pod: not worth a log line

    return Handler


def _safely(answer: Callable[[], tuple[int, dict[str, Any]]]) -> tuple[int, dict[str, Any]]:
    """``answer()``; its state is the event loop's and the repository scan's, read here from another thread: a
    dict that changed size while it was read is read again."""
    for _ in range(3):
        try:
            return answer()
        except RuntimeError:
            continue
    return 503, {"ready": False, "error": "the worker's state kept changing while it was read; probe again"}

