"""One dynamic batcher per model version: requests from every front door share it.

Batching: requests queue on the event loop; one runner task takes what is queued (in arrival order, up to
``max_batch_size`` images), runs the model in a one-thread executor (onnxruntime releases the GIL) and hands
each request its rows. ``max_queue_delay_s > 0`` waits up to that long after the oldest request for a fuller
batch, never past what a queued request's deadline or the queue-wait limit allows; with 0 nothing waits on
purpose: an idle batcher runs a lone request at once, and under load the requests that arrive while a batch runs
form the next batch.

A lone request (at most ``inline_max_images`` images, nothing queued or running, and no other request in the batcher
once the requests that arrived with it have had their turn on the event loop) runs at once, on the event loop: no
queue, no thread hand-off (about 200 µs less for a lone client). For ``OVERLAP_HOLD_S`` after two requests were in
the batcher at once, none is judged alone: gRPC calls take several turns of the event loop to reach the batcher, so
under load each found it idle, ran on the loop and held the next ones back until it was done; the calls then reached
the batcher one by one, never batched, and the loop ran every model run itself (16 gRPC clients: 9 in 10 calls met
no other in the servicer; alternating runs, 2,360-2,560 against 2,740-2,900 infer/s and p99 22-38 against 9-14 ms
without the lone-request path). When ``run_wide`` is given and ``board`` shows every worker idle (none running, the
others quiet), it runs with ``run_wide`` (a session with every core's threads) instead of ``run``. Under load
requests are not alone: they queue and batch as below, on one thread per worker while the other workers run too; a
queued batch runs with ``run_wide`` as well while ``board`` shows every other worker idle and nothing else running
in this one: all the load is on this worker (gRPC's connections are hashed onto workers, and perf_analyzer's three
landed on one in a start out of four), and its one-thread runs left the other cores idle. Lone runs with
``run_wide`` do not feed the estimate (they are faster than the queued runs it predicts); queued ones do (they are
the queued runs).

Large client batches: a request of more than ``max_batch_size`` images is split into chunks of that size,
submitted one after another: the next chunk is queued when the previous chunk's result arrives. The runner
takes whatever queued meanwhile before the big request has queued its next chunk, so a small request arriving
while a big one runs waits for at most one of its chunks. The answer is the chunks' rows in order; a failed
chunk fails the whole request.

Admission (``infer`` refuses before queueing; a few comparisons):
  * closed or draining: ``ModelNotReady``;
  * ``max_queue_images > 0`` and queued images + the first chunk exceed it: ``Overloaded``;
  * ``queue_budget_s > 0`` and the estimated wait exceeds it: ``Overloaded`` (the HTTP door asks this on the
    request's headers, ``check_admission``, and a request admitted there is not asked again: ``admitted``);
  * a ``deadline`` before now + estimated wait + estimated compute of all its images: ``DeadlineExceeded``.
A split request is judged once, on entry: on its first chunk for the bound and the budget, on all its images for
the deadline. Its later chunks are admitted work and are not judged again (the bound can be passed by up to one
chunk per split request in flight); they still expire like any queued request.

The estimate: a run of ``n`` images takes about ``fixed + per_image * n`` seconds (its fixed cost: the call,
the thread hand-off, onnxruntime's setup; its per-image cost: the convolutions). After each successful queued
run, exponentially-weighted moving averages (weight ``EWMA_WEIGHT``) of ``n``, its seconds, ``n²`` and ``n *
seconds`` give the least-squares line (``_RunCost``); while every run had the same size the two cannot be told
apart and all of it counts as per image. A run is learned as at most ``OUTLIER_FACTOR`` times what the line
expected of it: one run stalled by the OS on shared cores (tens of ms) otherwise tilted the line for many
runs, and the estimate refused 64 closed-loop gRPC clients (0.22 s estimated, 1 of 3 runs of the serving
benchmark); a real slowdown is still learned within a few runs. Queued images run in batches of up to
``max_batch_size``, so

    estimated_wait_s(extra) = max(0, cost(running images) - seconds it has run)
                              + ceil((queued images + extra) / max_batch_size) * fixed + (queued + extra) * per_image

``warm_up`` seeds it with a warm run of one image and one of ``WARM_UP_BATCH`` before the model serves. Run times
are measured on the thread that runs the model, without the event loop's delay in taking the result (under
load that delay is queueing, not compute). Before any run is measured (no warm-up) the estimate is 0 and
refuses nothing (only the hard bound and a deadline already passed apply). An earlier estimate (one per-image
average, learned from cold first runs and timed including the event loop's delay) charged small runs' fixed
cost to every queued image and said 0.10-0.35 s at 64 closed-loop gRPC clients: it refused requests the
server was answering in about 20 ms.

Expiry, checked when the runner reaches a request (no per-request timers): requests whose caller went away
(cancelled: client disconnect, gRPC deadline) are dropped, requests past their ``deadline`` fail with
``DeadlineExceeded``, requests queued longer than ``max_queue_wait_s`` fail with ``Overloaded``; none is computed.
A cancelled caller leaves the queue count at once (no wait for the runner to reach it).

Statistics (``stats()``, the Triton statistics extension): ``success``/``fail`` count requests (``ns`` from entry
to ``infer`` to its answer; ``fail`` is failure after admission); ``queue`` and ``compute_infer`` count chunks,
one per request unless it was split; ``execution_count`` and ``batch_stats`` count every run, failed ones too;
``inference_count`` counts images answered successfully; ``last_inference_ms`` is the wall-clock time (ms since
the epoch) the last run started.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.busy import BusyBoard
from serving.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded

RunFn = Callable[[np.ndarray], np.ndarray]
ObserveFn = Callable[[int, float], None]  # (batch size, queue seconds of its oldest request)

PHASES = ("compute_input", "compute_infer", "compute_output")
EWMA_WEIGHT = 0.2  # weight of the newest run in the moving averages of the estimate
WARM_UP_BATCH = 8  # warm_up runs one image and a batch of this many
OUTLIER_FACTOR = 3.0  # a run is learned as at most this many times what the estimate expected of it
OVERLAP_HOLD_S = 0.1  # no request runs inline for this long after two requests were in the batcher at once
UNKNOWN_RETRY_AFTER_S = 1.0  # retry_after_s of a refusal before any run has been measured
WAKE_EARLY_S = 0.02  # a batching delay cut short by a request's limits ends this long before them (timers run late)


@dataclass(slots=True)
class _Pending:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float  # time.monotonic()
    deadline: float | None
    queued: bool = True  # still counted in queued_images


class _RunCost:
    """Seconds of a run against its images, ``fixed + per_image * images``, fitted by exponentially-weighted
    least squares (see the module docstring)."""

    def __init__(self) -> None:
        self.measured = False
        self._n = self._t = self._nn = self._nt = 0.0
        self.fixed = self.per_image = 0.0

    def learn(self, images: int, seconds: float) -> None:
        if self.measured:  # a run stalled by the OS (the cores shared) counts as at most OUTLIER_FACTOR x expected
            seconds = min(seconds, OUTLIER_FACTOR * self.seconds(images, images))
        sample = (images, seconds, images * images, images * seconds)
        if not self.measured:
            self._n, self._t, self._nn, self._nt = sample
            self.measured = True
        else:
            self._n, self._t, self._nn, self._nt = (
                old + EWMA_WEIGHT * (new - old) for old, new in zip((self._n, self._t, self._nn, self._nt), sample,
                                                                     strict=True))
        variance = self._nn - self._n * self._n
        slope = (self._nt - self._n * self._t) / variance if variance > 1e-6 * self._nn else None
        if slope is None or not 0 <= slope <= self._t / self._n:  # sizes alike, or noise: all of it per image
            slope = self._t / self._n
        self.per_image, self.fixed = slope, max(0.0, self._t - slope * self._n)

    def seconds(self, images: int, max_batch_size: int) -> float:
        """Seconds to run ``images`` in batches of at most ``max_batch_size``."""
        return -(-images // max_batch_size) * self.fixed + images * self.per_image


@dataclass(slots=True)
class _Durations:
    count: int = 0
    ns: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


def _ms(seconds: float) -> str:
    """``seconds`` in milliseconds for a message: 0.1 ms resolution, three significant digits below it (a
    1 µs deadline read "0.0 ms")."""
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms >= 0.1 else f"{ms:.3g} ms"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class DynamicBatcher:
    def __init__(self, run: RunFn, max_batch_size: int, max_queue_delay_s: float = 0.0, *,
                 max_queue_images: int = 0, queue_budget_s: float = 0.1, max_queue_wait_s: float = 1.0,
                 observe: ObserveFn | None = None, name: str = "model", inline_max_images: int = 0,
                 run_wide: RunFn | None = None, board: BusyBoard | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        limits = {"max_queue_delay_s": max_queue_delay_s, "max_queue_images": max_queue_images,
                  "queue_budget_s": queue_budget_s, "max_queue_wait_s": max_queue_wait_s,
                  "inline_max_images": inline_max_images}
        negative = [f"{key}={value}" for key, value in limits.items() if value < 0]
        if negative:
            raise ValueError(f"batcher limits must be >= 0 (0 = off): {', '.join(negative)}")
        self._run, self.name = run, name
        self.max_batch_size, self.max_queue_delay_s = max_batch_size, max_queue_delay_s
        self.max_queue_images, self.queue_budget_s, self.max_queue_wait_s = (
            max_queue_images, queue_budget_s, max_queue_wait_s)
        self._observe = observe
        self.inline_max_images, self._run_wide, self._board = inline_max_images, run_wide, board
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._running: list[_Pending] = []
        self._running_images, self._running_since = 0, 0.0
        self._cost = _RunCost()  # the estimate
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._accepting, self._closed = True, False
        self._closed_reason = f"model {name} is being unloaded"
        self._active = 0  # requests admitted and not answered yet
        self._overlapped = -math.inf  # time.monotonic() when two requests were last in the batcher at once
        self._idle: asyncio.Event | None = None  # set by the last request out while draining
        self._inference_count = self._execution_count = self._rejected = self._dropped_cancelled = 0
        self._last_inference_ms = 0
        self._success, self._fail, self._queue_time, self._compute = (_Durations() for _ in range(4))
        self._compute_input, self._compute_output = _Durations(), _Durations()
        # per batch size: (compute_input, compute_infer, compute_output) of its runs
        self._batch_stats: dict[int, tuple[_Durations, _Durations, _Durations]] = {}

    # --- requests --------------------------------------------------------------------------------------------
    async def infer(self, images: np.ndarray, deadline: float | None = None, admitted: bool = False) -> np.ndarray:
        """Rows of the model output for ``images`` (N, ...), N >= 1.

        ``deadline``: absolute ``time.monotonic()`` seconds by which the caller needs the answer (None: none).
        ``admitted``: the request passed ``check_admission`` before its body was read; the budget is not applied
        again (refusing it now would waste the parse already paid for: under overload most requests admitted on
        their headers were refused here, by requests admitted in the same turn of the event loop), the bound and
        the deadline are. Raises ``Overloaded``, ``DeadlineExceeded`` or ``ModelNotReady`` when refused or
        expired, or what ``run`` raised."""
        start = time.monotonic()
        count = len(images)
        self._admit(count, deadline, start, budget=not admitted)
        self._active += 1
        if self._active > 1:
            self._overlapped = start
        try:
            alone = count <= self.inline_max_images and self._quiet() and start - self._overlapped > OVERLAP_HOLD_S
            if alone:
                await asyncio.sleep(0)  # requests that came in with this one get here now: then it is not alone
                alone = self._quiet() and self._active == 1
            output = self._run_inline(images) if alone else await self._queued(images, deadline)
        except Exception:
            self._fail.count += 1
            self._fail.ns += int((time.monotonic() - start) * 1e9)
            raise
        finally:
            self._active -= 1
            if self._idle is not None and not self._active:
                self._idle.set()
        self._success.count += 1
        self._success.ns += int((time.monotonic() - start) * 1e9)
        self._inference_count += count
        return output

    def _quiet(self) -> bool:
        """Nothing queued or running."""
        return not self._queue and not self._running and not self._closed

    async def _queued(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """``images`` through the queue, in chunks of at most ``max_batch_size``, one chunk queued at a time."""
        outputs = []
        for first in range(0, len(images), self.max_batch_size):
            pending = self._enqueue(images[first : first + self.max_batch_size], deadline)
            try:
                outputs.append(await pending.future)
            except asyncio.CancelledError:
                self._forget(pending)
                raise
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def check_admission(self, count: int = 1) -> None:
        """Raise ``Overloaded`` when a request of ``count`` images would be refused now by the queue bound or the
        budget (what ``infer`` checks first), without queueing anything: the HTTP door asks this when a request's
        headers are in, so that a refusal costs no body and no parsing (``serving.oip_rest.check_admission``)."""
        if self._accepting:
            self._check_queue(min(count, self.max_batch_size), time.monotonic())

    def has_room(self, count: int = 1) -> bool:
        """Whether a request of ``count`` images would pass the queue bound and budget now, counting nothing: a
        client pacing itself (a gRPC stream with requests of its own in progress) waits while this is False
        instead of being refused."""
        return self._accepting and self._queue_refusal(min(count, self.max_batch_size), time.monotonic()) is None

    def _admit(self, count: int, deadline: float | None, now: float, budget: bool = True) -> None:
        if not self._accepting:
            raise ModelNotReady(self._closed_reason)
        if count < 1:
            raise InvalidInput("a request needs at least one image")
        self._check_queue(min(count, self.max_batch_size), now, budget)
        if deadline is not None and now + (needed := self._estimate(count, now)) > deadline:
            self._rejected += 1
            if deadline <= now:
                raise DeadlineExceeded(f"model {self.name}: the request's deadline passed "
                                       f"{_ms(now - deadline)} before it could be queued")
            raise DeadlineExceeded(f"model {self.name}: the deadline ({_ms(deadline - now)} from now) "
                                   f"cannot be met, the estimated queue wait plus compute is {_ms(needed)}")

    def _check_queue(self, first: int, now: float, budget: bool = True) -> None:
        """The bound on queued images and (``budget``) the budget on the estimated wait, for a first chunk of
        ``first`` images: raise the refusal, counted."""
        refusal = self._queue_refusal(first, now, budget)
        if refusal is not None:
            self._rejected += 1
            raise refusal

    def _queue_refusal(self, first: int, now: float, budget: bool = True) -> Overloaded | None:
        """The ``Overloaded`` that the queue bound or (``budget``) the wait budget gives a first chunk of ``first``
        images now, or None."""
        if self.max_queue_images and self._queued_images + first > self.max_queue_images:
            return Overloaded(f"model {self.name} is overloaded: {self._queued_images} images are queued, "
                              f"the limit is {self.max_queue_images}", self._retry_after_s(now))
        if not budget or not self.queue_budget_s:
            return None
        wait = self._estimate(0, now)
        if wait > self.queue_budget_s:
            return Overloaded(f"model {self.name} is overloaded: the estimated queue wait is {wait:.3f} s, "
                              f"the budget is {self.queue_budget_s} s", self._retry_after_s(now))
        return None

    def _enqueue(self, images: np.ndarray, deadline: float | None) -> _Pending:
        if self._closed:  # a later chunk of a split request, after close()
            raise ModelNotReady(self._closed_reason)
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done():
            self._loop, self._wakeup = loop, asyncio.Event()
            self._runner = loop.create_task(self._serve())
        pending = _Pending(images, loop.create_future(), time.monotonic(), deadline)
        self._queue.append(pending)
        self._queued_images += len(images)
        self._wakeup.set()
        return pending

    def _forget(self, pending: _Pending) -> None:
        """The caller went away: a request still queued leaves the count now and is never computed."""
        if pending.queued:
            pending.queued = False
            self._queued_images -= len(pending.images)
            self._dropped_cancelled += 1

    # --- the runner ------------------------------------------------------------------------------------------
    async def _serve(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_queue_delay_s > 0:
                await self._wait_for_more()
            batch = self._take_batch(time.monotonic())
            if batch:
                await self._run_batch(loop, batch)

    async def _wait_for_more(self) -> None:
        """Wait for a fuller batch, until ``_stop_waiting_at`` (asked again as each request arrives)."""
        assert self._wakeup is not None
        while self._queue and self._queued_images < self.max_batch_size and not self._closed:
            remaining = self._stop_waiting_at() - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _stop_waiting_at(self) -> float:
        """When the runner stops waiting for a fuller batch: ``max_queue_delay_s`` after the oldest queued request,
        or sooner where waiting longer would fail a queued request, which the delay must never do: before the
        oldest has waited ``max_queue_wait_s``, and before any request's deadline less the estimated run of what
        is queued (a delay of 3 s under the 1 s wait limit failed every queued request of an idle server with
        "overloaded", and a request with a 0.5 s timeout got its 504 after 3 s)."""
        live = [pending for pending in self._queue if pending.queued]  # not those whose caller went away
        if not live:
            return -math.inf
        oldest = live[0].enqueued
        until = oldest + self.max_queue_delay_s
        if self.max_queue_wait_s:
            until = min(until, oldest + self.max_queue_wait_s - WAKE_EARLY_S)
        run = self._cost.seconds(self._queued_images, self.max_batch_size) if self._cost.measured else 0.0
        for pending in live:
            if pending.deadline is not None:
                until = min(until, pending.deadline - run - WAKE_EARLY_S)
        return until

    def _take_batch(self, now: float) -> list[_Pending]:
        """The next batch in arrival order; drops, on the way, requests gone or expired."""
        batch: list[_Pending] = []
        size = 0
        queue = self._queue
        while queue:
            pending = queue[0]
            if pending.future.done():  # cancelled: the caller went away
                queue.popleft()
                self._forget(pending)
                continue
            n = len(pending.images)
            error: Exception | None = None
            if pending.deadline is not None and now > pending.deadline:
                error = DeadlineExceeded(f"model {self.name}: the deadline passed after "
                                         f"{now - pending.enqueued:.3f} s in the queue")
            elif self.max_queue_wait_s and now - pending.enqueued > self.max_queue_wait_s:
                error = Overloaded(f"model {self.name} is overloaded: the request waited "
                                   f"{now - pending.enqueued:.3f} s in the queue, the limit is "
                                   f"{self.max_queue_wait_s} s", self._retry_after_s(now))
            elif size + n > self.max_batch_size:
                break
            queue.popleft()
            pending.queued = False
            self._queued_images -= n
            if error is None:
                batch.append(pending)
                size += n
            else:
                pending.future.set_exception(error)
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        taken = time.monotonic()
        inputs = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        size = len(inputs)
        started = time.monotonic()
        if self._observe:
            self._observe(size, started - batch[0].enqueued)
        self._running, self._running_images, self._running_since = batch, size, started
        self._last_inference_ms = int(time.time() * 1000)
        queue_s = sum(taken - p.enqueued for p in batch)
        try:
            outputs, run_s = await loop.run_in_executor(self._executor, self._run_marked, self._queued_run(), inputs)
        except Exception as exc:  # the model failed: every request of this batch gets the error, no other
            finished = time.monotonic()
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            self._account_run(len(batch), queue_s, size, (taken, started, finished, time.monotonic()))
            return
        finished = time.monotonic()
        row = 0
        for p in batch:
            n = len(p.images)
            if not p.future.done():  # the caller may have gone away while its batch ran
                p.future.set_result(outputs[row : row + n])
            row += n
        self._account_run(len(batch), queue_s, size, (taken, started, finished, time.monotonic()))
        self._learn(size, run_s)

    def _queued_run(self) -> RunFn:
        """How a queued batch runs: with ``run_wide`` while ``board`` shows every other worker idle and nothing else
        running in this one (the load is all on this worker: gRPC's connections hashed onto it, see the module
        docstring), else with ``run``."""
        if self._run_wide is not None and self._board is not None and self._board.all_idle():
            return self._run_wide
        return self._run

    def _run_inline(self, images: np.ndarray) -> np.ndarray:
        """Run a request that found the batcher idle at once, on this thread (see the module docstring)."""
        size = len(images)
        wide = self._run_wide is not None and (self._board is None or self._board.all_idle())
        started = time.monotonic()
        if self._observe:
            self._observe(size, 0.0)
        self._last_inference_ms = int(time.time() * 1000)
        try:
            outputs, run_s = self._run_marked(self._run_wide if wide else self._run, images)
        finally:
            finished = time.monotonic()
            self._account_run(1, 0.0, size, (started, started, finished, finished))
        if not wide:
            self._learn(size, run_s)
        return outputs

    def _run_marked(self, run: RunFn, images: np.ndarray) -> tuple[np.ndarray, float]:
        """``run(images)``, checked, with this worker marked busy on the board meanwhile; and the seconds it took
        on the thread that ran it (what the estimate learns: not the event loop's delay in taking the result)."""
        if self._board:
            self._board.running(True)
        started = time.perf_counter()
        try:
            outputs = run(images)
        finally:
            seconds = time.perf_counter() - started
            if self._board:
                self._board.running(False)
        if len(outputs) != len(images):
            raise RuntimeError(f"model {self.name} returned {len(outputs)} rows for {len(images)} images")
        return outputs, seconds

    def warm_up(self, example: np.ndarray) -> None:
        """Run ``example`` (one input row, shape (1, ...)) alone and as a batch of ``WARM_UP_BATCH`` twice each
        before serving (the wide session: alone): the first runs of a shape are slow, and the second run of each
        size seeds the estimate, so that admission starts from what a warm run costs. Not a full batch: the
        memory onnxruntime keeps for it (about 170 MB per worker for the shipped models at 64) is then held
        whether or not such batches ever come."""
        if self._run_wide is not None:
            self._run_wide(example)
        for size in sorted({1, min(WARM_UP_BATCH, self.max_batch_size)}):
            images = np.repeat(example, size, axis=0)
            self._run(images)
            _, seconds = self._run_marked(self._run, images)
            self._learn(size, seconds)

    def _account_run(self, requests: int, queue_s: float, size: int, times: tuple[float, float, float, float]) -> None:
        """Statistics of one finished run of ``requests`` requests (``queue_s``: their seconds in the queue, summed):
        ``times`` = (batch taken, inputs joined, run done, rows handed)."""
        taken, started, finished, handed = times
        self._running, self._running_images = [], 0
        self._execution_count += 1
        phases = [int((b - a) * 1e9) for a, b in ((taken, started), (started, finished), (finished, handed))]
        per_size = self._batch_stats.setdefault(size, (_Durations(), _Durations(), _Durations()))
        for total, one_run, ns in zip((self._compute_input, self._compute, self._compute_output), per_size, phases,
                                      strict=True):
            total.count += requests
            total.ns += ns * requests
            one_run.count += 1
            one_run.ns += ns
        self._queue_time.count += requests
        self._queue_time.ns += int(queue_s * 1e9)

    # --- the estimate ----------------------------------------------------------------------------------------
    def _learn(self, size: int, seconds: float) -> None:
        self._cost.learn(size, seconds)

    def _estimate(self, extra_images: int, now: float) -> float:
        if not self._cost.measured:
            return 0.0
        running = 0.0
        if self._running_images:
            running = max(0.0, self._cost.seconds(self._running_images, self.max_batch_size)
                          - (now - self._running_since))
        return running + self._cost.seconds(self._queued_images + extra_images, self.max_batch_size)

    def estimated_wait_s(self, extra_images: int = 0) -> float:
        """Seconds until the running batch, the queued images and ``extra_images`` more have run (0 before the
        first run is measured); see the module docstring for the formula."""
        return self._estimate(extra_images, time.monotonic())

    def _retry_after_s(self, now: float) -> float:
        """When a refused client should retry: the estimated time to drain the queue, at least one full batch."""
        if not self._cost.measured:
            return UNKNOWN_RETRY_AFTER_S
        return max(self._estimate(0, now), self._cost.seconds(self.max_batch_size, self.max_batch_size))

    # --- state -----------------------------------------------------------------------------------------------
    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def closed(self) -> bool:
        """True once the batcher admits nothing more (draining or closed)."""
        return not self._accepting

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see the module docstring); integers, durations in ns."""
        return {
            "inference_count": self._inference_count,
            "execution_count": self._execution_count,
            "success": self._success.as_dict(),
            "fail": self._fail.as_dict(),
            "queue": self._queue_time.as_dict(),
            "compute_input": self._compute_input.as_dict(),
            "compute_infer": self._compute.as_dict(),
            "compute_output": self._compute_output.as_dict(),
            "batch_stats": {size: {name: d.as_dict() for name, d in zip(PHASES, phases, strict=True)}
                            for size, phases in sorted(self._batch_stats.items())},
            "rejected": self._rejected,
            "dropped_cancelled": self._dropped_cancelled,
            "last_inference_ms": self._last_inference_ms,
        }

    # --- shutdown --------------------------------------------------------------------------------------------
    async def drain(self, timeout_s: float, reason: str | None = None) -> None:
        """Stop admitting; let queued and running requests finish for up to ``timeout_s``, then ``close``
        (failing what is left with ``ModelNotReady``). Await it on the batcher's event loop."""
        if reason:
            self._closed_reason = reason
        self._accepting = False
        if self._active:
            self._idle = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        self.close()

    def close(self, reason: str | None = None) -> None:
        """Stop admitting and fail every queued and running request at once with ``ModelNotReady(reason)``
        (default: the model is being unloaded). Callable from any thread: off the batcher's event loop the
        requests are failed by a callback on that loop."""
        if reason:
            self._closed_reason = reason
        self._accepting, self._closed = False, True
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._fail_all()
            return
        try:
            loop.call_soon_threadsafe(self._fail_all)
        except RuntimeError:  # that loop is closed: nobody can await its requests any more
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _fail_all(self) -> None:
        for p in (*self._queue, *self._running):
            if not p.future.done():
                p.future.set_exception(ModelNotReady(self._closed_reason))
            p.queued = False
        self._queue.clear()
        self._queued_images = 0
        if self._wakeup is not None:
            self._wakeup.set()  # the runner sees `_closed` and ends
        self._executor.shutdown(wait=False, cancel_futures=True)
