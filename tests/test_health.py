"""The probe port (``serving.health``, ``serving.probe_process``): answered by a process of its own, from what the
worker publishes; liveness from the loop's heartbeat."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest

from serving import health as health_module
from serving.health import HealthServer
from serving.probe_process import BEAT, HEARTBEAT_S
from serving.shared_slots import map_slots

STALL_S = 3 * HEARTBEAT_S  # past it a worker's loop is stuck: longer than a heartbeat's period, as it must be


@pytest.fixture
def health(tmp_path) -> Iterator[tuple[HealthServer, asyncio.AbstractEventLoop, dict]]:
    """A HealthServer on a free port, worker 1 of 2, its heartbeat on an event loop running in a thread of its own."""
    state = {"ready": True}
    server = HealthServer("127.0.0.1", 0, lambda: dict(state), tmp_path, workers=2, slot=0, stall_s=STALL_S)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(lambda: (server.start(), started.set()))
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(5)
    yield server, loop, state
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def get(server: HealthServer, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{server.port}{path}", timeout=2)


def on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], object]) -> None:
    """Run ``call`` on ``loop`` (the worker's event loop) and wait for it."""
    async def run() -> None:
        call()
    asyncio.run_coroutine_threadsafe(run(), loop).result(5)


def test_readiness_follows_the_worker_and_says_why_not(health):
    server, loop, state = health
    assert get(server, "/readyz").status_code == 200
    assert get(server, "/v2/health/ready").json() == {"ready": True}
    state.update(ready=False, not_ready={"mnist-cnn/3": "sha256 mismatch"})
    on_loop(loop, server.publish)  # as the worker does when a scan or SIGTERM changes its readiness
    r = get(server, "/readyz")
    assert r.status_code == 503 and r.json()["not_ready"] == {"mnist-cnn/3": "sha256 mismatch"}
    state.clear()
    state["ready"] = True  # a change nobody published: the heartbeat publishes it
    deadline = time.monotonic() + HEARTBEAT_S + 2
    while get(server, "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "a readiness change was not published by the heartbeat"
        time.sleep(0.05)
    r = get(server, "/metrics")
    assert r.status_code == 404 and "/readyz" in r.json()["error"]
    assert r.headers["connection"] == "close"  # no client holds a thread between probes


def test_a_readiness_that_cannot_be_written_is_logged_and_the_heartbeat_goes_on(health, tmp_path, caplog):
    server, _, state = health
    beats = map_slots(tmp_path / "heartbeats", 2, 0, BEAT.size)  # this worker's slot, as the probe process reads it
    server.readiness_file = tmp_path / "gone" / "readiness-0.json"  # its directory removed under the worker
    state["ready"] = False
    first_beat = BEAT.unpack_from(beats, 0)[0]
    time.sleep(2 * HEARTBEAT_S + 0.3)  # each beat tried to write
    assert "readiness could not be written" in caplog.text
    assert BEAT.unpack_from(beats, 0)[0] > first_beat  # still beating
    assert get(server, "/readyz").status_code == 200  # the last readiness written


WORKER = """
import asyncio, sys
from pathlib import Path
from serving.health import HealthServer
loop = asyncio.new_event_loop()
server = HealthServer("127.0.0.1", 0, lambda: {"ready": True}, Path(sys.argv[1]), stall_s=float(sys.argv[2]))
loop.call_soon(lambda: (server.start(), print(server.port, server._process.pid, flush=True)))
loop.run_forever()
"""


@pytest.fixture
def worker(tmp_path) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """A worker-like process serving a probe port: the process, the port, the probe process's pid."""
    process = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(STALL_S)], stdout=subprocess.PIPE,
                               text=True)
    try:
        port, probe_pid = map(int, process.stdout.readline().split())
        yield process, port, probe_pid
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(5)
        process.stdout.close()


def probe(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)


def test_probes_are_answered_while_the_worker_cannot_run_and_liveness_sees_the_stall(worker):
    process, port, _ = worker
    assert probe(port, "/livez").status_code == 200
    process.send_signal(signal.SIGSTOP)  # the worker's interpreter runs nothing: no event loop, no GIL
    try:
        assert probe(port, "/readyz").status_code == 200  # answered by the probe process, from what was published
        time.sleep(STALL_S + 0.5)  # past stall_s without a heartbeat
        r = probe(port, "/livez")
        assert r.status_code == 503 and "event loop has not run" in r.json()["error"]
    finally:
        process.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + HEARTBEAT_S + 2  # the loop runs again: so does its heartbeat
    while probe(port, "/livez").status_code != 200:
        assert time.monotonic() < deadline, "liveness did not come back with the heartbeat"
        time.sleep(0.05)


def test_the_probe_process_ends_with_its_worker_and_is_started_again_if_it_dies_alone(worker):
    process, port, probe_pid = worker
    os.kill(probe_pid, signal.SIGKILL)
    deadline = time.monotonic() + HEARTBEAT_S + 5
    while True:  # the worker's heartbeat starts another
        try:
            if probe(port, "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the probe process was not started again"
        time.sleep(0.05)
    successor = next(child for child in psutil.Process(process.pid).children() if child.pid != probe_pid)
    process.kill()  # the worker dies, however: its probe process goes with it
    process.wait(5)
    deadline = time.monotonic() + 5
    while successor.is_running() and successor.status() != psutil.STATUS_ZOMBIE:  # ended (reaped or not)
        assert time.monotonic() < deadline, "the probe process outlived its worker"
        time.sleep(0.05)
    with pytest.raises(httpx.ConnectError):
        probe(port, "/readyz")


def test_liveness_judges_every_worker_that_beats(health, tmp_path):
    server, _, _ = health
    other = map_slots(tmp_path / "heartbeats", 2, 1, BEAT.size)  # worker 2's slot, as its own process maps it
    assert get(server, "/livez").status_code == 200  # worker 2 has not started its heartbeat: not judged
    BEAT.pack_into(other, BEAT.size, time.monotonic() - 5)  # worker 2's loop stuck for 5 s
    r = get(server, "/livez")
    assert r.status_code == 503 and r.json()["error"].startswith("worker 2:")
    # worker 2 killed and respawned: its successor clears the stale beat before it loads its models
    HealthServer("127.0.0.1", 0, dict, tmp_path, workers=2, slot=1)
    assert get(server, "/livez").status_code == 200


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = HealthServer("127.0.0.1", taken.getsockname()[1], dict, tmp_path)
        with pytest.raises(RuntimeError, match="CNNSERVE_HEALTH_PORT: cannot listen on"):
            server.start()


def test_a_probe_process_that_cannot_start_stops_the_worker_with_a_clear_error(tmp_path, monkeypatch):
    for failing, why in (([sys.executable, "-c", "raise SystemExit(3)"], "ended with status 3"),
                         ([sys.executable, "-c", "import time; time.sleep(30)"], "did not answer within 0.5 s")):
        monkeypatch.setattr(health_module, "command", lambda *_, failing=failing: failing)
        monkeypatch.setattr(health_module, "START_WAIT_S", 0.5)
        server = HealthServer("127.0.0.1", 0, dict, tmp_path)
        with pytest.raises(RuntimeError, match=f"CNNSERVE_HEALTH_PORT: cannot start .*{why}"):
            server.start()
        with socket.socket() as again:  # and the port is let go
            again.bind(("127.0.0.1", server.port))
