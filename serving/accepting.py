"""Accept every connection waiting on the HTTP listener at each turn of the event loop.

uvloop (libuv) accepts one connection per listening socket per turn of its loop. Idle, a turn takes microseconds
and nobody notices; under load a turn serves hundreds of ready connections and takes 10 to 100 ms, so a burst of
new connections (a client pool growing, clients that open a connection per request, kubelet's probes, which
open a new one each time) waits in the kernel's accept queue for seconds, requests and all, before the service
sees any of them: scratch, 2x overload from a generator that opens connections as it needs them, the listener's
queue held 300 to 850 connections for 2 s and the refusals' p99 was 1.6 s. ``Acceptor`` watches a duplicate of
the listener with the loop's own reader and accepts up to ``batch`` waiting connections per turn, handing each
to the server's protocol factory (``loop.connect_accepted_socket``), as asyncio's own loop does; uvloop's
watcher keeps taking its one, and a race between the two costs nothing (the loser's accept finds none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("cnnserve.accepting")

BATCH = 64  # connections accepted per turn of the loop at most: a storm is taken in a few turns, not one long one


class Acceptor:
    """Accepts connections waiting on ``listener`` (a duplicate of the server's listening socket, owned from now
    on) for ``protocol_factory``'s protocols, on the running loop, until ``stop()`` or until the listener stops
    listening."""

    def __init__(self, listener: socket.socket, protocol_factory: Callable[[], asyncio.Protocol],
                 batch: int = BATCH) -> None:
        self.listener, self.protocol_factory, self.batch = listener, protocol_factory, batch
        self.accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        self._loop.add_reader(self.listener.fileno(), self._accept_waiting)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.listener.fileno())
            self._loop = None
            self.listener.close()

    def _accept_waiting(self) -> None:
        for _ in range(self.batch):
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left (another worker, or uvloop's own watcher, took the rest)
            except OSError as exc:  # stopped listening (shutdown): uvloop's watcher reports its own errors
                log.debug("stopped accepting: %s", exc)
                self.stop()
                return
            connection.setblocking(False)
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.accepted += 1
            task = self._loop.create_task(self._loop.connect_accepted_socket(self.protocol_factory, connection))
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[object]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the peer left before its transport was made
            log.debug("an accepted connection could not be served: %s", task.exception())
