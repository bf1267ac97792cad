"""Health probes on a port of their own (``CNNSERVE_HEALTH_PORT``), answered by a small process beside each worker.

On the HTTP port a probe waits for the worker's event loop like any request, and under overload a turn of the loop
takes tens of milliseconds. A thread of the worker answering the port needed the GIL several times per probe,
which the loop and grpc's threads hand over only every switch interval (5 ms): its ``/readyz`` p99 was 72-175 ms
in open-loop gRPC bursts (serving/README.md). So each worker binds the port (``SO_REUSEPORT``, as the gRPC port is
shared: a probe reaches one worker's) and hands the socket to a process of its own, ``serving.probe_process``,
which answers from two files the worker keeps up to date:

- readiness: the body of ``DataPlane.readiness()`` (the first scan is done, a model serves, strict readiness if
  set, not draining at shutdown; the versions that are not ready and why), written atomically when it changes,
  checked every ``HEARTBEAT_S`` and at once when the worker knows it changed (``publish``);
- heartbeats: every worker's event loop stamps its slot of a shared memory-mapped file every ``HEARTBEAT_S``;
  ``/livez`` is 503 once any worker's is older than ``stall_s`` (a deadlock, a callback that never returns),
  whichever worker's process the probe reached, so that the liveness probe restarts the pod. A busy loop still
  beats: an overloaded worker is not restarted for being busy. A worker that has not started its heartbeat yet, or
  has stopped it on its way out, is not judged.

The worker waits for the process to answer before it goes on starting, so one that cannot start stops the worker
with a ``CNNSERVE_HEALTH_PORT`` error. The process ends with the worker (its standard input is a pipe from the
worker); the worker starts it again if it dies, after a delay that doubles, up to a minute, while it keeps dying.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.model_card import atomic_write
from serving.probe_process import BEAT, HEARTBEAT_S, READY, command, end
from serving.shared_slots import map_slots

log = logging.getLogger("cnnserve.health")
START_WAIT_S = 10.0  # how long ``start`` waits for the probe process to answer
RESTART_DELAY_MAX_S = 60.0  # the longest wait before starting again a probe process that keeps dying


class HealthServer:
    """The probe port of one worker: ``start`` on its event loop, ``stop`` at shutdown."""

    def __init__(self, host: str, port: int, readiness: Callable[[], dict[str, Any]], shared_dir: Path,
                 workers: int = 1, slot: int = 0, stall_s: float = 10.0) -> None:
        """``shared_dir``: the directory the server's ``workers`` share; ``slot``: this worker's place among them."""
        self.host, self.port, self.stall_s = host, port, stall_s
        self._readiness = readiness
        self._beats_file, self._workers, self._slot = shared_dir / "heartbeats", workers, slot
        self._beats = map_slots(self._beats_file, workers, slot, BEAT.size)
        self.readiness_file = shared_dir / f"readiness-{slot}.json"
        # not judged until it beats: a respawned worker's predecessor (killed, crashed) left its last beat here,
        # which would age past stall_s while this one loads its models
        BEAT.pack_into(self._beats, slot * BEAT.size, 0.0)
        self._published: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._listener: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0  # when the probe process was last started (time.monotonic())
        self._restart_delay = HEARTBEAT_S  # before starting it again once it has died; doubles while it keeps dying

    def start(self) -> None:
        """Bind the port, start the process that answers it, and start the heartbeat on the running loop."""
        try:
            self._listener = _listen(self.host, self.port)
        except OSError as exc:
            raise RuntimeError(f"CNNSERVE_HEALTH_PORT: cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                               "free the port, choose another, or set 0 to turn the probe port off") from exc
        self.port = self._listener.getsockname()[1]
        self.publish()
        try:
            self._spawn(wait=True)
        except (OSError, RuntimeError) as exc:
            self._listener.close()
            raise RuntimeError(f"CNNSERVE_HEALTH_PORT: cannot start the process that answers the probe port "
                               f"({exc}); set 0 to turn the probe port off") from exc
        self._heartbeat()
        log.info("health probes on http://%s:%d (/readyz, /livez)", self.host, self.port)

    async def stop(self) -> None:
        """Stop the heartbeat, then the probe process (its standard input ends), then close the port."""
        if self._timer is not None:
            self._timer.cancel()
            BEAT.pack_into(self._beats, self._slot * BEAT.size, 0.0)  # on its way out: not judged
        if self._process is not None:
            process, self._process = self._process, None
            await asyncio.to_thread(end, process)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def publish(self) -> None:
        """Write the worker's readiness for the probe process, if it changed since it was last written; a failure
        is logged, and the write tried again at the next heartbeat (the probe port answers the last written)."""
        try:
            body = json.dumps(self._readiness()).encode()
            if body != self._published:
                with atomic_write(self.readiness_file, "wb", durable=False) as f:
                    f.write(body)
                self._published = body
        except Exception:  # the readiness is best effort: whatever failed, the worker goes on (and so does its beat)
            log.exception("the probe port's readiness could not be written to %s", self.readiness_file)

    def _spawn(self, wait: bool = False) -> None:
        """Start the probe process; ``wait``: until it answers (RuntimeError if it does not within START_WAIT_S)."""
        assert self._listener is not None
        fd = self._listener.fileno()
        self._process = subprocess.Popen(command(fd, self.readiness_file, self._beats_file, self._workers,
                                                 self.stall_s),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE if wait else subprocess.DEVNULL,
                                         pass_fds=(fd,))
        self._started_at = time.monotonic()
        if wait:
            _wait_until_serving(self._process)

    def _heartbeat(self) -> None:
        # the next beat first: nothing that fails below stops the heartbeat (which /livez would read as a stuck loop)
        self._timer = asyncio.get_running_loop().call_later(HEARTBEAT_S, self._heartbeat)
        BEAT.pack_into(self._beats, self._slot * BEAT.size, time.monotonic())
        self._watch_process()
        self.publish()

    def _watch_process(self) -> None:
        """Start the probe process again if it has died, ``self._restart_delay`` after it was last started; the
        delay doubles at each start, up to ``RESTART_DELAY_MAX_S``, and is reset once one has lived that long."""
        process, now = self._process, time.monotonic()
        if process is None:
            return
        if process.poll() is None:
            if now - self._started_at > RESTART_DELAY_MAX_S:
                self._restart_delay = HEARTBEAT_S
            return
        if now - self._started_at < self._restart_delay:
            return
        log.error("the probe port's process ended (exit status %s): starting it again", process.returncode)
        end(process)  # its pipe
        self._restart_delay = min(2 * self._restart_delay, RESTART_DELAY_MAX_S)
        try:
            self._spawn()
        except OSError:
            self._started_at = now
            log.exception("the probe port's process could not be started: trying again in %g s", self._restart_delay)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``, shared with the other workers' (``SO_REUSEPORT``)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(64)
    except OSError:
        listener.close()
        raise
    return listener


def _wait_until_serving(process: subprocess.Popen[bytes]) -> None:
    """Wait for ``process`` to write READY (then close its standard output); RuntimeError, the process killed, if it
    ends or writes something else first, or stays silent for ``START_WAIT_S``."""
    assert process.stdout is not None
    with process.stdout:
        answered, _, _ = select.select([process.stdout], [], [], START_WAIT_S)
        line = process.stdout.readline() if answered else b""
    if line != READY:
        ended = answered and line == b""
        process.kill()
        status = process.wait()
        what = f"ended with status {status}" if ended else f"did not answer within {START_WAIT_S:g} s"
        raise RuntimeError(f"it {what}; its error, if any, is in the log above")
