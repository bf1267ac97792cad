"""One dynamic batcher per model version: requests from every front door share it.

Requests queue on the event loop; one runner at a time takes everything queued (up to
``max_batch_size`` images), runs the model in a worker thread (onnxruntime releases the GIL), and
hands each request its rows. A client batch stays whole unless it alone exceeds the maximum, then it
is split into chunks. With ``max_queue_delay_s == 0`` nothing waits on purpose: under load, requests
that arrive while a batch runs form the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

RunFn = Callable[[np.ndarray], np.ndarray]
ObserveFn = Callable[[int, float], None]  # (batch size, queue seconds of its oldest request)


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(self, run: RunFn, max_batch_size: int, max_queue_delay_s: float = 0.0,
                 observe: ObserveFn | None = None, name: str = "model") -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run, self.max_batch_size, self.max_queue_delay_s = run, max_batch_size, max_queue_delay_s
        self._observe = observe
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None

    async def infer(self, images: np.ndarray) -> np.ndarray:
        """Rows of the model output for ``images`` (N, ...), N >= 1."""
        if len(images) > self.max_batch_size:
            chunks = [images[i : i + self.max_batch_size] for i in range(0, len(images), self.max_batch_size)]
            return np.concatenate(await asyncio.gather(*(self.infer(c) for c in chunks)))
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done():
            self._wakeup = asyncio.Event()
            self._runner = loop.create_task(self._serve())
        pending = _Pending(images, loop.create_future())
        self._queue.append(pending)
        self._queued_images += len(images)
        self._wakeup.set()
        return await pending.future

    async def _serve(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_queue_delay_s > 0:
                await self._wait_for_more(self._queue[0].enqueued + self.max_queue_delay_s)
            batch = self._take_batch()
            inputs = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            if self._observe:
                self._observe(len(inputs), time.perf_counter() - batch[0].enqueued)
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, inputs)
            except Exception as exc:  # the model failed: every request in the batch gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            start = 0
            for p in batch:
                if not p.future.done():  # the caller may have gone away
                    p.future.set_result(outputs[start : start + len(p.images)])
                start += len(p.images)

    async def _wait_for_more(self, deadline: float) -> None:
        assert self._wakeup is not None
        while self._queued_images < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch, size = [], 0
        while self._queue and size + len(self._queue[0].images) <= self.max_batch_size:
            p = self._queue.popleft()
            batch.append(p)
            size += len(p.images)
        self._queued_images -= size
        return batch

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
