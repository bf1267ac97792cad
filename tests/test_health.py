"""The probe port (``serving.health``): answered off the event loop, liveness from the loop's heartbeat."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from serving.health import BEAT, HealthServer
from serving.shared_slots import map_slots


@pytest.fixture
def health(tmp_path) -> Iterator[tuple[HealthServer, asyncio.AbstractEventLoop, dict]]:
    """A HealthServer on a free port, worker 1 of 2, its heartbeat on an event loop running in a thread of its own."""
    state = {"ready": True}
    server = HealthServer("127.0.0.1", 0, lambda: dict(state), tmp_path / "beats", workers=2, slot=0, stall_s=0.3)
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


def test_readiness_follows_the_worker_and_says_why_not(health):
    server, _, state = health
    assert get(server, "/readyz").status_code == 200
    assert get(server, "/v2/health/ready").json() == {"ready": True}
    state.update(ready=False, not_ready={"mnist-cnn/3": "sha256 mismatch"})
    r = get(server, "/readyz")
    assert r.status_code == 503 and r.json()["not_ready"] == {"mnist-cnn/3": "sha256 mismatch"}
    r = get(server, "/metrics")
    assert r.status_code == 404 and "/readyz" in r.json()["error"]
    assert r.headers["connection"] == "close"  # no client holds a thread between probes


def test_probes_are_answered_while_the_event_loop_is_blocked_and_liveness_sees_the_stall(health):
    server, loop, _ = health
    assert get(server, "/livez").status_code == 200
    blocked = threading.Event()
    loop.call_soon_threadsafe(lambda: (blocked.set(), time.sleep(1.0)))  # a callback that holds the loop 1 s
    assert blocked.wait(2)
    t0 = time.monotonic()
    assert get(server, "/readyz").status_code == 200  # not queued behind the loop
    assert time.monotonic() - t0 < 0.3
    time.sleep(0.5)  # past stall_s (0.3) without a heartbeat
    r = get(server, "/livez")
    assert r.status_code == 503 and "event loop has not run" in r.json()["error"]
    time.sleep(1.0)  # the loop runs again: so does its heartbeat
    assert get(server, "/livez").status_code == 200


def test_liveness_judges_every_worker_that_beats(health, tmp_path):
    server, _, _ = health
    other = map_slots(tmp_path / "beats", 2, 1, BEAT.size)  # worker 2's slot, as its own process maps it
    assert get(server, "/livez").status_code == 200  # worker 2 has not started its heartbeat: not judged
    BEAT.pack_into(other, BEAT.size, time.monotonic() - 5)  # worker 2's loop stuck for 5 s
    r = get(server, "/livez")
    assert r.status_code == 503 and r.json()["error"].startswith("worker 2:")
    # worker 2 killed and respawned: its successor clears the stale beat before it loads its models
    HealthServer("127.0.0.1", 0, dict, tmp_path / "beats", workers=2, slot=1)
    assert get(server, "/livez").status_code == 200


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = HealthServer("127.0.0.1", taken.getsockname()[1], dict, tmp_path / "beats")
        with pytest.raises(RuntimeError, match="CNNSERVE_HEALTH_PORT: cannot listen on"):
            server.start()
