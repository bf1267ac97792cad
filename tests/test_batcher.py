"""DynamicBatcher with a fake run function: batching, splitting, admission, expiry, shutdown, statistics.

The fake records every batch it runs and can hold runs on a gate, so queueing is created by events, not by
timing. Images are (N, 1) float rows holding unique ids; the fake answers each row doubled, so every caller can
check that it got exactly its own rows.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import pytest

from serving.batcher import DynamicBatcher
from serving.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded

pytestmark = pytest.mark.timeout(30)  # a broken batcher can leave the event loop unable to end: fail, not hang

POISON = -1.0  # a batch holding this id fails


class FakeModel:
    """A run function: records its input, waits for the gate, sleeps ``seconds``, answers the rows doubled."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.seconds = 0.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(images.copy())
        if not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        time.sleep(self.seconds)
        if (images == POISON).any():
            raise ValueError("poisoned batch")
        return images * 2

    def ids(self) -> list[float]:
        """Every row id run so far."""
        return [] if not self.batches else np.concatenate(self.batches).ravel().tolist()


@pytest.fixture
def model() -> Iterator[FakeModel]:
    fake = FakeModel()
    yield fake
    fake.gate.set()  # release an executor thread a failed test left waiting


def rows(first: int, n: int) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.float64).reshape(n, 1)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a test coroutine; debug mode makes asyncio raise on calls from the wrong thread; no hang past 10 s."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 10)

    return asyncio.run(bounded(), debug=True)


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "condition not reached within 5 s"
        await asyncio.sleep(0.001)


async def hold_runner(batcher: DynamicBatcher, model: FakeModel) -> asyncio.Task[np.ndarray]:
    """Start a one-image request (id 1000) whose run waits for the gate: what comes next queues behind it."""
    model.gate.clear()
    before = len(model.batches)
    task = asyncio.create_task(batcher.infer(rows(1000, 1)))
    await until(lambda: len(model.batches) > before)
    return task


def test_concurrent_callers_get_exactly_their_rows(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8)
        blocker = await hold_runner(batcher, model)
        sizes = [1, 3, 2, 5, 1, 4, 2, 8, 1, 1, 3, 6]
        inputs = [rows(100 * i, n) for i, n in enumerate(sizes)]
        tasks = [asyncio.create_task(batcher.infer(x)) for x in inputs]
        await until(lambda: batcher.queued_images == sum(sizes))
        model.gate.set()
        outputs = await asyncio.gather(*tasks)
        await blocker
        for x, y in zip(inputs, outputs, strict=True):
            np.testing.assert_array_equal(y, x * 2)
        queued_runs = model.batches[1:]
        assert max(len(b) for b in queued_runs) <= 8
        assert len(queued_runs) < len(sizes), "no batch held more than one request"
        assert sorted(np.concatenate(queued_runs).ravel()) == sorted(np.concatenate(inputs).ravel())
        assert batcher.queued_images == 0

    run(main())


def test_oversize_request_is_split_and_reassembled_in_order(model):
    batcher = DynamicBatcher(model, 4)
    images = rows(0, 10)
    out = run(batcher.infer(images))
    assert [len(b) for b in model.batches] == [4, 4, 2]
    np.testing.assert_array_equal(out, images * 2)


def test_small_request_waits_for_one_chunk_of_a_big_one(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 4)
        model.gate.clear()
        big = asyncio.create_task(batcher.infer(rows(0, 12)))
        await until(lambda: len(model.batches) == 1)  # the first chunk runs
        small = asyncio.create_task(batcher.infer(rows(100, 1)))
        await until(lambda: batcher.queued_images == 1)
        model.gate.set()
        np.testing.assert_array_equal(await big, rows(0, 12) * 2)
        await small
        assert [b[0, 0] for b in model.batches] == [0, 100, 4, 8]

    run(main())


def test_idle_batcher_without_delay_runs_a_lone_request_at_once(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8, 0.0)
        np.testing.assert_array_equal(await asyncio.wait_for(batcher.infer(rows(0, 1)), 2), rows(0, 1) * 2)

    run(main())


def test_requests_within_the_delay_window_share_a_batch(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 2, 5.0)  # a full batch (2 images) ends the window early
        first = asyncio.create_task(batcher.infer(rows(0, 1)))
        await asyncio.sleep(0.05)  # the runner has had its turn: without a window it would run `first` alone
        await batcher.infer(rows(1, 1))
        await first
        assert [len(b) for b in model.batches] == [2]

    run(main())


def test_a_delay_longer_than_the_queue_wait_limit_is_cut_short_not_a_refusal(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8, 5.0, max_queue_wait_s=0.2)
        start = time.monotonic()
        np.testing.assert_array_equal(await batcher.infer(rows(0, 1)), rows(0, 1) * 2)  # not "overloaded"
        assert time.monotonic() - start < 1.0  # nor after the 5 s delay

    run(main())


def test_a_request_arriving_with_a_deadline_cuts_the_delay_short_for_the_batch(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8, 5.0, max_queue_wait_s=0)
        start = time.monotonic()
        first = asyncio.create_task(batcher.infer(rows(0, 1)))  # no limit of its own: would wait 5 s
        await asyncio.sleep(0.05)
        second = await batcher.infer(rows(1, 1), deadline=time.monotonic() + 0.5)
        np.testing.assert_array_equal(second, rows(1, 1) * 2)  # answered, not DeadlineExceeded after 5 s
        await first
        assert time.monotonic() - start < 1.0 and [len(b) for b in model.batches] == [2]

    run(main())


def test_a_delay_cut_short_by_a_deadline_leaves_the_estimated_run_before_it():
    starts: list[float] = []

    def tenth_of_a_second_an_image(images: np.ndarray) -> np.ndarray:
        starts.append(time.monotonic())
        time.sleep(0.1 * len(images))
        return images * 2

    async def main() -> None:
        batcher = DynamicBatcher(tenth_of_a_second_an_image, 8, 5.0, max_queue_wait_s=0)
        batcher.warm_up(rows(0, 1))  # the estimate: 0.1 s an image
        deadline = time.monotonic() + 1.0
        await batcher.infer(rows(1, 1), deadline=deadline)
        # taken about 0.1 s (the run) + 20 ms before the deadline; without the estimate, 20 ms before it
        assert starts[-1] < deadline - 0.07

    run(main())


def test_a_failed_run_reaches_its_batch_only(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 2)
        blocker = await hold_runner(batcher, model)
        poisoned, neighbour, next_batch = (asyncio.create_task(batcher.infer(x))
                                           for x in (np.array([[POISON]]), rows(10, 1), rows(20, 1)))
        await until(lambda: batcher.queued_images == 3)
        model.gate.set()
        results = await asyncio.gather(blocker, poisoned, neighbour, next_batch, return_exceptions=True)
        assert [len(b) for b in model.batches] == [1, 2, 1]
        assert isinstance(results[1], ValueError) and isinstance(results[2], ValueError)
        np.testing.assert_array_equal(results[3], rows(20, 1) * 2)

    run(main())


def test_a_run_answering_the_wrong_number_of_rows_fails_clearly():
    batcher = DynamicBatcher(lambda images: images[:1], 8, name="broken")
    with pytest.raises(RuntimeError, match="broken returned 1 rows for 3 images"):
        run(batcher.infer(rows(0, 3)))


def test_empty_request_and_bad_limits_are_refused(model):
    with pytest.raises(InvalidInput, match="at least one image"):
        run(DynamicBatcher(model, 4).infer(rows(0, 0)))
    with pytest.raises(ValueError, match="queue_budget_s=-1"):
        DynamicBatcher(model, 4, queue_budget_s=-1)
    assert model.batches == []


def test_a_caller_that_went_away_is_never_computed(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8)
        blocker = await hold_runner(batcher, model)
        gone = asyncio.create_task(batcher.infer(rows(10, 2)))
        kept = asyncio.create_task(batcher.infer(rows(20, 1)))
        await until(lambda: batcher.queued_images == 3)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queued_images == 1  # it left the count at once
        model.gate.set()
        await kept
        await blocker
        assert 10 not in model.ids() and 11 not in model.ids() and 20 in model.ids()
        assert batcher.stats()["dropped_cancelled"] == 1
        assert batcher.queued_images == 0

    run(main())


def test_close_fails_queued_and_running_requests_and_refuses_new_ones(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8)
        blocker = await hold_runner(batcher, model)
        queued = [asyncio.create_task(batcher.infer(rows(10 * i, 1))) for i in range(3)]
        await until(lambda: batcher.queued_images == 3)
        batcher.close("model m version 3 is being removed")
        results = await asyncio.wait_for(asyncio.gather(blocker, *queued, return_exceptions=True), 2)
        assert all(isinstance(r, ModelNotReady) and "being removed" in r.message for r in results)
        with pytest.raises(ModelNotReady):
            await batcher.infer(rows(0, 1))
        assert batcher.closed and batcher.queued_images == 0

    run(main())


def test_close_from_another_thread(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8)
        blocker = await hold_runner(batcher, model)
        queued = asyncio.create_task(batcher.infer(rows(10, 1)))
        await until(lambda: batcher.queued_images == 1)
        await asyncio.to_thread(batcher.close)
        results = await asyncio.wait_for(asyncio.gather(blocker, queued, return_exceptions=True), 2)
        assert all(isinstance(r, ModelNotReady) for r in results)

    run(main())


def test_drain_lets_queued_work_finish_and_refuses_new_requests(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 1)
        blocker = await hold_runner(batcher, model)
        queued = asyncio.create_task(batcher.infer(rows(10, 1)))
        await until(lambda: batcher.queued_images == 1)
        drain = asyncio.create_task(batcher.drain(5))
        await until(lambda: batcher.closed)
        with pytest.raises(ModelNotReady):
            await batcher.infer(rows(0, 1))
        model.gate.set()
        await asyncio.wait_for(drain, 5)
        np.testing.assert_array_equal(await queued, rows(10, 1) * 2)
        await blocker

    run(main())


def test_drain_fails_what_is_left_after_its_timeout(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 1)
        blocker = await hold_runner(batcher, model)
        queued = asyncio.create_task(batcher.infer(rows(10, 1)))
        await until(lambda: batcher.queued_images == 1)
        await batcher.drain(0.05)
        results = await asyncio.wait_for(asyncio.gather(blocker, queued, return_exceptions=True), 2)
        assert all(isinstance(r, ModelNotReady) for r in results)
        assert 10 not in model.ids()

    run(main())


def test_hard_queue_bound_refuses_with_a_retry_time(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8, max_queue_images=2)
        blocker = await hold_runner(batcher, model)
        queued = asyncio.create_task(batcher.infer(rows(10, 2)))
        await until(lambda: batcher.queued_images == 2)
        with pytest.raises(Overloaded) as refused:
            await batcher.infer(rows(20, 1))
        assert refused.value.retry_after_s > 0
        assert batcher.stats()["rejected"] == 1
        model.gate.set()
        await queued
        await blocker

    run(main())


def test_nothing_is_refused_on_the_estimate_before_a_run_is_measured(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 1, queue_budget_s=0.001)
        blocker = await hold_runner(batcher, model)
        queued = [asyncio.create_task(batcher.infer(rows(10 * i, 1))) for i in range(5)]
        await until(lambda: batcher.queued_images == 5)
        model.gate.set()
        await asyncio.gather(blocker, *queued)

    run(main())


async def measured_batcher(model: FakeModel, **limits: Any) -> DynamicBatcher:
    """A batcher that has measured one run of at least 0.05 s per image."""
    model.seconds = 0.05
    batcher = DynamicBatcher(model, 1, **limits)
    await batcher.infer(rows(500, 1))
    assert batcher.estimated_wait_s(1) >= 0.05
    return batcher


def test_queue_budget_refuses_once_the_wait_is_estimated(model):
    async def main() -> None:
        batcher = await measured_batcher(model, queue_budget_s=0.01)
        blocker = await hold_runner(batcher, model)
        await until(lambda: batcher.estimated_wait_s() == 0)  # the running batch is past its estimate
        admitted = asyncio.create_task(batcher.infer(rows(10, 1)))  # nothing ahead: admitted
        await until(lambda: batcher.queued_images == 1)
        with pytest.raises(Overloaded) as refused:  # one image (>= 0.05 s) ahead exceeds the 0.01 s budget
            await batcher.infer(rows(20, 1))
        assert refused.value.retry_after_s >= 0.05
        model.gate.set()
        await asyncio.gather(blocker, admitted)
        assert 20 not in model.ids() and batcher.stats()["rejected"] == 1

    run(main())


def test_check_admission_refuses_as_infer_would_and_a_request_admitted_on_it_is_not_judged_again(model):
    async def main() -> None:
        batcher = await measured_batcher(model, queue_budget_s=0.01)
        blocker = await hold_runner(batcher, model)
        await until(lambda: batcher.estimated_wait_s() == 0)
        batcher.check_admission()  # nothing ahead
        first = asyncio.create_task(batcher.infer(rows(10, 1)))
        await until(lambda: batcher.queued_images == 1)
        with pytest.raises(Overloaded):  # the headers' check, as infer would refuse now
            batcher.check_admission()
        late = asyncio.create_task(batcher.infer(rows(20, 1), admitted=True))  # passed it before the queue grew
        await until(lambda: batcher.queued_images == 2)
        model.gate.set()
        await asyncio.gather(blocker, first, late)
        assert 20 in model.ids() and batcher.stats()["rejected"] == 1

    run(main())


def test_a_deadline_that_cannot_be_met_is_refused_without_running(model):
    async def main() -> None:
        unmeasured = DynamicBatcher(model, 1)
        with pytest.raises(DeadlineExceeded, match=r"deadline passed 1\d{3}\.\d ms before it could be queued"):
            await unmeasured.infer(rows(10, 1), deadline=time.monotonic() - 1)
        batcher = await measured_batcher(model)
        with pytest.raises(DeadlineExceeded, match=r"\(\d+\.\d ms from now\) cannot be met"):  # compute >= 0.05 s
            await batcher.infer(rows(20, 1), deadline=time.monotonic() + 0.01)
        assert 10 not in model.ids() and 20 not in model.ids()
        assert unmeasured.stats()["rejected"] == batcher.stats()["rejected"] == 1

    run(main())


def test_a_request_expired_in_the_queue_is_not_computed(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8)
        blocker = await hold_runner(batcher, model)
        late = asyncio.create_task(batcher.infer(rows(10, 1), deadline=time.monotonic() + 0.05))
        await until(lambda: batcher.queued_images == 1)
        await asyncio.sleep(0.1)
        model.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        await blocker
        assert 10 not in model.ids() and batcher.queued_images == 0

    run(main())


def test_a_request_queued_too_long_fails_overloaded(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8, max_queue_wait_s=0.05)
        blocker = await hold_runner(batcher, model)
        stale = asyncio.create_task(batcher.infer(rows(10, 1)))
        await until(lambda: batcher.queued_images == 1)
        await asyncio.sleep(0.1)
        model.gate.set()
        with pytest.raises(Overloaded) as failed:
            await stale
        assert failed.value.retry_after_s > 0
        await blocker
        assert 10 not in model.ids() and batcher.queued_images == 0

    run(main())


def test_stats_count_what_was_sent(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 4, max_queue_images=12)
        blocker = await hold_runner(batcher, model)  # run 1: 1 image
        inputs = [rows(10, 2), rows(20, 2),  # run 2: 4 images
                  np.array([[POISON]]), rows(30, 3),  # run 3: 4 images, fails
                  rows(40, 5)]  # runs 4 and 5: split 4 + 1
        tasks = [asyncio.create_task(batcher.infer(x)) for x in inputs]
        await until(lambda: batcher.queued_images == 12)
        with pytest.raises(Overloaded):
            await batcher.infer(rows(50, 1))
        model.gate.set()
        results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        assert [isinstance(r, Exception) for r in results] == [False, False, False, True, True, False]
        stats = batcher.stats()
        assert stats["inference_count"] == 1 + 2 + 2 + 5
        assert stats["execution_count"] == len(model.batches) == 5
        runs = {size: s["compute_infer"]["count"] for size, s in stats["batch_stats"].items()}
        assert runs == {1: 2, 4: 3} and sum(size * n for size, n in runs.items()) == len(model.ids())
        assert all(s["compute_input"]["count"] == s["compute_output"]["count"] == runs[size]
                   for size, s in stats["batch_stats"].items())
        assert stats["success"]["count"] == 4 and stats["fail"]["count"] == 2 and stats["rejected"] == 1
        assert stats["queue"]["count"] == stats["compute_infer"]["count"] == 7  # one per chunk
        assert stats["compute_input"]["count"] == stats["compute_output"]["count"] == 7  # perf_analyzer checks it
        assert stats["dropped_cancelled"] == 0 and stats["last_inference_ms"] > 0
        assert all(s["ns"] > 0 for s in (stats["success"], stats["fail"], stats["compute_infer"]))
        assert batcher.queued_images == 0

    run(main())


# --- a lone request runs inline (serving/batcher.py, "A lone request") -------------------------------------
def thread_recording(model: FakeModel) -> tuple[Callable[[np.ndarray], np.ndarray], list[threading.Thread]]:
    """``model`` as a run function that also records the thread each run ran on."""
    threads: list[threading.Thread] = []

    def recording(images: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return model(images)

    return recording, threads


def test_a_lone_request_runs_on_the_event_loop_thread_and_is_counted(model):
    recording, threads = thread_recording(model)

    async def main() -> None:
        batcher = DynamicBatcher(recording, 8, inline_max_images=4)
        np.testing.assert_array_equal(await batcher.infer(rows(0, 4)), rows(0, 4) * 2)
        assert threads == [threading.current_thread()]
        np.testing.assert_array_equal(await batcher.infer(rows(10, 5)), rows(10, 5) * 2)  # over the limit: queued
        assert threads[1] is not threading.current_thread()
        stats = batcher.stats()
        assert (stats["execution_count"], stats["inference_count"], stats["success"]["count"]) == (2, 9, 2)
        assert stats["compute_infer"]["count"] == stats["queue"]["count"] == 2

    run(main())


def test_requests_arriving_together_are_batched_not_run_inline_one_by_one(model):
    async def main() -> None:
        batcher = DynamicBatcher(model, 8, inline_max_images=8)
        inputs = [rows(10 * i, 1) for i in range(6)]
        outputs = await asyncio.gather(*(batcher.infer(x) for x in inputs))
        for x, y in zip(inputs, outputs, strict=True):
            np.testing.assert_array_equal(y, x * 2)
        assert len(model.batches) < len(inputs), "every request ran alone"

    run(main())


def test_after_requests_overlap_a_lone_looking_request_queues_for_a_while(model, monkeypatch):
    """Under load, gRPC calls reach the batcher one by one: each looked alone, ran on the event loop and held the
    next ones back. Once two requests were in the batcher together, requests queue (and batch) for the hold."""
    monkeypatch.setattr("serving.batcher.OVERLAP_HOLD_S", 0.2)
    recording, threads = thread_recording(model)

    async def main() -> None:
        batcher = DynamicBatcher(recording, 8, inline_max_images=8)
        await batcher.infer(rows(0, 1))
        assert threads[-1] is threading.current_thread()  # alone: inline
        await asyncio.gather(batcher.infer(rows(10, 1)), batcher.infer(rows(20, 1)))  # two at once
        np.testing.assert_array_equal(await batcher.infer(rows(30, 1)), rows(30, 1) * 2)
        assert threads[-1] is not threading.current_thread(), "ran inline right after requests overlapped"
        await asyncio.sleep(0.25)
        await batcher.infer(rows(40, 1))
        assert threads[-1] is threading.current_thread(), "still queued after the hold"

    run(main())


class Board:
    """A BusyBoard stand-in: whether the other workers are idle, and what this worker marked."""

    def __init__(self, others_idle: bool) -> None:
        self.idle, self.marks = others_idle, []

    def all_idle(self) -> bool:
        return self.idle

    def running(self, busy: bool) -> None:
        self.marks.append(busy)


@pytest.mark.parametrize("others_idle", [True, False])
def test_every_core_is_used_only_while_the_other_workers_are_idle(model, others_idle):
    wide_runs = []

    def wide(images: np.ndarray) -> np.ndarray:
        wide_runs.append(len(images))
        if not model.gate.wait(10):  # held as the model's runs are
            raise TimeoutError("the test never opened the gate")
        return images * 2

    async def main() -> None:
        board = Board(others_idle)
        batcher = DynamicBatcher(model, 16, inline_max_images=8, run_wide=wide, board=board)
        np.testing.assert_array_equal(await batcher.infer(rows(0, 2)), rows(0, 2) * 2)
        assert (wide_runs, len(model.batches)) == (([2], 0) if others_idle else ([], 1))
        assert board.marks == [True, False]
        # queued batches (here behind a running one) run wide too while the others are idle: the load is all here
        model.gate.clear()
        blocker = asyncio.create_task(batcher.infer(rows(1000, 9)))  # over inline_max_images: queued, runs
        await until(lambda: len(model.batches) == 2 or len(wide_runs) == 2)
        queued = asyncio.create_task(batcher.infer(rows(20, 1)))
        await until(lambda: batcher.queued_images == 1)
        model.gate.set()
        await asyncio.gather(blocker, queued)
        assert wide_runs == ([2, 9, 1] if others_idle else []) and len(model.batches) == (0 if others_idle else 3)

    run(main())


# --- the estimate: fixed + per-image cost of a run (serving/batcher.py, "The estimate") --------------------
def test_run_cost_separates_the_fixed_cost_from_the_per_image_cost():
    from serving.batcher import _RunCost

    cost = _RunCost()
    for n in [1, 4, 16, 2, 32, 8, 1, 64, 3, 24] * 5:
        cost.learn(n, 0.002 + 0.0002 * n)
    assert cost.fixed == pytest.approx(0.002, rel=1e-3) and cost.per_image == pytest.approx(0.0002, rel=1e-3)
    assert cost.seconds(100, 64) == pytest.approx(2 * 0.002 + 100 * 0.0002, rel=1e-3)  # two runs: 64 + 36
    alike = _RunCost()
    for _ in range(5):
        alike.learn(4, 0.004)
    assert (alike.fixed, alike.per_image) == (0.0, pytest.approx(0.001))  # one size: all of it per image


def test_queue_of_small_runs_is_not_charged_their_fixed_cost_per_image(model):
    """64 queued single-image requests after small slow runs: they will run as one batch, so the estimate is one
    fixed cost plus 64 per-image costs (the old per-image average said 64 fixed costs and refused them)."""
    batcher = DynamicBatcher(model, 64)
    for n in (1, 2, 1, 8, 1, 4):
        batcher._learn(n, 0.004 + 0.0001 * n)
    batcher._queued_images = 64
    assert batcher.estimated_wait_s() == pytest.approx(0.004 + 64 * 0.0001, rel=0.05)


def test_warm_up_runs_one_image_and_a_small_batch_and_seeds_the_estimate(model):
    batcher = DynamicBatcher(model, 64, queue_budget_s=0.05)
    assert batcher.estimated_wait_s(8) == 0  # nothing measured: nothing refused on the estimate
    model.seconds = 0.01
    batcher.warm_up(rows(0, 1))
    assert [len(b) for b in model.batches] == [1, 1, 8, 8]  # not 64: its memory would be kept
    assert 0.005 < batcher.estimated_wait_s(8) < 0.1  # one warm batch, about 10 ms


def test_one_stalled_run_moves_the_estimate_a_little_and_a_real_slowdown_is_learned():
    from serving.batcher import _RunCost

    cost = _RunCost()
    for n in [1, 8, 32, 64] * 5:
        cost.learn(n, 0.001 + 0.0002 * n)
    full = cost.seconds(64, 64)
    cost.learn(64, 50 * full)  # descheduled for a while
    assert cost.seconds(64, 64) < 2 * full  # not 50x: learned as OUTLIER_FACTOR x expected
    for _ in range(15):
        cost.learn(64, 10 * full)  # the model really got slower
    assert cost.seconds(64, 64) > 8 * full
