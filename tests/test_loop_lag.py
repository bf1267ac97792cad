"""The event-loop lag that load shedding acts on (serving/loop_lag.py), on a real asyncio loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.errors import Overloaded
from serving.loop_lag import LoopLag


def test_a_blocked_loop_is_behind_by_how_long_it_was_blocked_and_refuses_past_the_limit():
    async def main() -> None:
        lag = LoopLag(limit_s=0.04, period_s=0.005)
        lag.start()
        await asyncio.sleep(0.05)
        lag.check("test")  # an idle loop is not behind
        time.sleep(0.1)  # blocked: the pending timer is overdue
        assert lag.behind_s() >= 0.09
        with pytest.raises(Overloaded, match=r"event loop is \d+ ms behind \(limit 40 ms\)") as refused:
            lag.check("test")
        assert refused.value.retry_after_s >= 1
        await asyncio.sleep(0.05)  # caught up
        assert lag.behind_s() < 0.04
        lag.check("test")
        lag.stop()

    asyncio.run(main())


def test_a_limit_of_zero_never_refuses():
    async def main() -> None:
        lag = LoopLag(limit_s=0)
        lag.start()
        time.sleep(0.05)
        lag.check("test")
        assert lag.behind_s() == 0

    asyncio.run(main())
