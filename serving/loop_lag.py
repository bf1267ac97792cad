"""Load shedding on event-loop lag: the signal that tells a worker it cannot keep up.

Under open-loop overload a worker's bottleneck is its event loop (HTTP parsing, the web framework, the
codecs), not onnxruntime: the batcher's queue stays short and its admission estimate refuses nothing while
requests wait, unread, in socket buffers and in the loop's ready queue, and every request (``/readyz``
included) sees that wait. ``LoopLag`` measures it: a timer due every ``period_s`` records how late it fires.
When the loop has been more than ``limit_s`` behind without a break for ``window_s``, and the timer after the
first late one was late too (fired late, or due and still waiting longer than ``limit_s``), the backlog is
standing (CoDel's rule, on the timer's lateness), and the doors refuse new inference requests at once (HTTP 503
with ``Retry-After`` before the request reaches the web framework, ``serving.uvicorn_hooks.install_load_shedding``; gRPC
``UNAVAILABLE`` before decoding), which costs the loop a small part of what serving them would, so it catches up
and the latency of what it does serve stays bounded. One late timer alone is a stall, however long: a garbage
collection, a slow first run, a neighbour's burst of CPU or a paused process (``kill -STOP``, VM steal) refuses
nobody, and the requests that waited through it are served once the loop is on time again (an outside probe
saw a single 0.3 s pause refuse the requests that arrived during it, under light load, before this rule).
Nor is a lag with no other inference request in progress a backlog (``DataPlane.check_loop_lag``): a lone
client's large requests keep the loop late by their own parsing and running, and its next request queues behind
nothing. Health, metadata and metrics requests are never refused.
"""

from __future__ import annotations

import asyncio

from serving.errors import Overloaded
from serving.metrics import observe_loop_lag, observe_shed

RETRY_AFTER_S = 1.0


class LoopLag:
    """How far behind the running event loop is, and for how long, against a limit (``limit_s`` <= 0: never
    overloaded)."""

    def __init__(self, limit_s: float, window_s: float, period_s: float = 0.01) -> None:
        self.limit_s, self.window_s, self.period_s = limit_s, window_s, period_s
        self.last_lag_s = 0.0  # how late the last timer fired
        self._late_since: float | None = None  # since when every timer has fired more than limit_s late
        self._late_timers = 0  # how many timers in a row fired more than limit_s late
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start measuring on the running loop."""
        if self.limit_s <= 0:
            return
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, now: float) -> None:
        self._due = now + self.period_s
        self._timer = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        self.last_lag_s = max(0.0, now - self._due)
        observe_loop_lag(self.last_lag_s)
        if self.last_lag_s <= self.limit_s:
            self._late_since, self._late_timers = None, 0
        else:
            if self._late_since is None:
                self._late_since = self._due + self.limit_s
            self._late_timers += 1
        self._schedule(now)

    def behind_s(self) -> float:
        """The loop's lag now: the last timer's, or the pending timer's if it is overdue by more."""
        if self._loop is None:
            return 0.0
        return max(self.last_lag_s, self._loop.time() - self._due)

    def late_for_s(self) -> float:
        """How long the loop has been more than ``limit_s`` behind without a break, once a second timer in a row
        confirms it (0: it is not, or only one timer was late: a stall)."""
        if self._loop is None or self._late_since is None:
            return 0.0
        now = self._loop.time()
        if self._late_timers < 2 and now - self._due <= self.limit_s:  # the timer after the late one is on time
            return 0.0
        return now - self._late_since

    def shedding(self) -> bool:
        """Whether ``check`` would refuse now: the loop has been more than ``limit_s`` behind for ``window_s``."""
        late_for = self.late_for_s()
        return bool(late_for) and late_for >= self.window_s

    def check(self, door: str) -> None:
        """Raise ``Overloaded`` (counted per ``door`` in ``cnnserve_shed_requests_total``, and so marked counted)
        when the loop has been more than ``limit_s`` behind for ``window_s``."""
        if self.shedding():
            late_for = self.late_for_s()
            observe_shed(door, "loop_lag")
            exc = Overloaded(f"server overloaded: its event loop is {1000 * self.behind_s():.0f} ms behind and has "
                             f"been over {1000 * self.limit_s:.0f} ms behind for {1000 * late_for:.0f} ms; retry "
                             "later", RETRY_AFTER_S)
            exc.counted = True
            raise exc
