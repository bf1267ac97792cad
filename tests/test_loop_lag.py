"""The event-loop lag that load shedding acts on (serving/loop_lag.py), on a real asyncio loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.errors import Overloaded
from serving.loop_lag import LoopLag


def run_blocked(lag: LoopLag, block_s: float, times: int) -> float:
    """Start ``lag`` on a fresh loop, block the loop ``times`` times for ``block_s`` (the timer running in between),
    then return ``late_for_s()`` as a request read right then would see it, and raise what ``check`` raises."""

    async def main() -> float:
        lag.start()
        await asyncio.sleep(0.05)
        lag.check("test")  # an idle loop is not behind
        for _ in range(times):
            time.sleep(block_s)
            for _ in range(2):  # the loop runs what is due, the timer included, then blocks again
                await asyncio.sleep(0)
        try:
            late_for = lag.late_for_s()
            lag.check("test")
            return late_for
        finally:
            lag.stop()

    return asyncio.run(main())


def test_a_loop_still_behind_after_a_long_stall_refuses():
    lag = LoopLag(limit_s=0.04, window_s=0.2, period_s=0.005)
    with pytest.raises(Overloaded, match=r"event loop is \d+ ms behind and has been over 40 ms behind for \d+ ms"
                       ) as refused:
        run_blocked(lag, 0.3, 2)  # the timer after the late one is late too: a backlog, not a stall
    assert refused.value.retry_after_s >= 1


def test_one_stall_longer_than_the_window_refuses_nobody_once_the_loop_is_on_time():
    """A paused process (kill -STOP), VM steal or a long collection: one late timer. The requests read right
    after it, before the next timer is due, are served."""
    lag = LoopLag(limit_s=0.04, window_s=0.2, period_s=0.005)
    assert run_blocked(lag, 0.6, 1) == 0
    assert lag.behind_s() >= 0.5  # it was that far behind, and says so


def test_a_standing_backlog_of_many_late_iterations_refuses():
    lag = LoopLag(limit_s=0.04, window_s=0.2, period_s=0.005)
    with pytest.raises(Overloaded):
        run_blocked(lag, 0.06, 8)  # every iteration 60 ms: each timer fires more than 40 ms late


def test_a_backlog_shorter_than_the_window_refuses_nobody():
    lag = LoopLag(limit_s=0.04, window_s=0.2, period_s=0.005)
    late_for = run_blocked(lag, 0.06, 2)  # behind for about 80 ms, confirmed by the second late timer
    assert 0.05 <= late_for < 0.2
    assert lag.behind_s() >= 0.05


def test_a_loop_that_caught_up_is_not_late():
    lag = LoopLag(limit_s=0.04, window_s=0.2, period_s=0.005)

    async def main() -> None:
        lag.start()
        time.sleep(0.3)
        await asyncio.sleep(0.05)  # caught up: the timers fire on time again
        assert lag.late_for_s() == 0 and lag.behind_s() < 0.04
        lag.check("test")
        lag.stop()

    asyncio.run(main())


def test_a_limit_of_zero_never_refuses():
    lag = LoopLag(limit_s=0, window_s=0)
    assert run_blocked(lag, 0.3, 1) == 0
