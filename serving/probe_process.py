"""The process that answers a worker's probe port (``command`` starts it, from ``serving.health.HealthServer``;
standard library only, run as a script in Python's isolated mode, so it starts in tens of milliseconds and holds
about 20 MB).

It shares no interpreter with the worker, so no GIL: an answer needs only a few microseconds of a core, which the
kernel's scheduler hands a process waking from sleep first, however busy the worker's event loop and its gRPC
threads are. It answers from two files the worker keeps:

- ``GET /readyz`` (and ``/v2/health/ready``): the readiness body the worker last published (``--readiness``, JSON
  written atomically whenever it changes): 200 when it says ready, else 503 with it (the versions that are not
  ready and why).
- ``GET /livez`` (and ``/v2/health/live``): 200 while every worker's event loop runs: each loop stamps its slot of
  ``--beats`` (a memory-mapped file of ``BEAT`` slots, one per worker) every ``HEARTBEAT_S``; once any worker's is
  older than ``--stall-s`` that loop is stuck and the answer is 503 naming it. A busy loop still beats. A slot of 0
  (not started, or on its way out) is not judged.

The listening socket is the worker's (``--fd``, inherited), so a port that cannot be bound is the worker's error.
Once it serves, the process writes ``READY`` on its standard output (the worker waits for it at start). It ends when
its standard input ends: when the worker closes it or dies, however it dies. SIGTERM and SIGINT are ignored: the
worker, draining, wants its probes answered (not ready) until it exits.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HEARTBEAT_S = 0.5  # how often a worker's event loop stamps its heartbeat
READ_TIMEOUT_S = 2.0  # a probe connection that sends nothing for this long is closed
READY_PATHS = {"/readyz", "/v2/health/ready"}
LIVE_PATHS = {"/livez", "/v2/health/live"}
BEAT = struct.Struct("d")  # a worker's slot: time.monotonic() of its loop's last heartbeat, 0 = not judged
READY = b"serving\n"  # written on standard output once the process answers


def command(fd: int, readiness: Path, beats: Path, workers: int, stall_s: float) -> list[str]:
    """The command line of a probe process answering on the inherited socket ``fd`` (see ``main``): this file as a
    script, isolated (no site-packages, no PYTHON* variables, not the working directory): it needs the standard
    library only, and no other ``serving`` package on the path can stand in for it."""
    return [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--fd", str(fd), "--readiness",
            str(readiness), "--beats", str(beats), "--workers", str(workers), "--stall-s", str(stall_s)]


def end(process: subprocess.Popen[bytes], wait_s: float = 5.0) -> None:
    """End a probe process started with ``command``: close its standard input, and kill it if it has not gone
    within ``wait_s``."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def readiness_answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The status of a readiness probe's answer with ``body`` (``DataPlane.readiness()``): 200 when ready, else 503."""
    return (200 if body.get("ready") else 503), body


class ProbeAnswers:
    """What the probe port answers, read from the worker's files at each probe."""

    def __init__(self, readiness: Path, beats: Path, workers: int, stall_s: float) -> None:
        self.readiness, self.workers, self.stall_s = readiness, workers, stall_s
        with open(beats, "rb") as f:  # the worker created it at its size before starting this process
            self._beats = mmap.mmap(f.fileno(), workers * BEAT.size, access=mmap.ACCESS_READ)

    def ready(self) -> tuple[int, dict[str, Any]]:
        try:
            return readiness_answer(json.loads(self.readiness.read_bytes()))
        except (OSError, ValueError) as exc:
            return 503, {"ready": False, "error": f"the worker's readiness cannot be read ({exc})"}

    def live(self) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        for worker in range(self.workers):
            beat = BEAT.unpack_from(self._beats, worker * BEAT.size)[0]
            if beat and now - beat > self.stall_s:
                return 503, {"live": False, "error": f"worker {worker + 1}: its event loop has not run for "
                                                     f"{now - beat:.1f} s (the limit is {self.stall_s:g} s)"}
        return 200, {"live": True}


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _handler(answers: ProbeAnswers) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT_S

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in READY_PATHS:
                status, body = answers.ready()
            elif path in LIVE_PATHS:
                status, body = answers.live()
            else:
                status, body = 404, {"error": f"no route {path}: this port answers /readyz and /livez"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")  # kubelet opens one per probe: no client holds a thread
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.close_connection = True

        def do_HEAD(self) -> None:
            self.do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a probe every few seconds per pod: not worth a log line

    return Handler


def serve(listener: socket.socket, answers: ProbeAnswers) -> _Server:
    """An HTTP server answering probes on ``listener`` (bound and listening), in threads; ``serve_forever`` runs it."""
    server = _Server(listener.getsockname()[:2], _handler(answers), bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    return server


def _end_with_stdin() -> None:
    """Exit once standard input ends: the worker closed it, or died."""
    while sys.stdin.buffer.read(4096):
        pass
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="the listening socket, inherited from the worker")
    parser.add_argument("--readiness", type=Path, required=True, help="the worker's readiness body (JSON)")
    parser.add_argument("--beats", type=Path, required=True, help="the workers' heartbeat slots")
    parser.add_argument("--workers", type=int, required=True, help="how many slots --beats holds")
    parser.add_argument("--stall-s", type=float, required=True, help="a heartbeat older than this fails /livez")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with_stdin, name="end-with-stdin", daemon=True).start()
    server = serve(socket.socket(fileno=args.fd), ProbeAnswers(args.readiness, args.beats, args.workers, args.stall_s))
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
