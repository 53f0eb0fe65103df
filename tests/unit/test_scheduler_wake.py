"""The scheduler's wake on node changes: at most one extra round per gap, none lost."""

from __future__ import annotations

import asyncio

from runplane_scheduler.loop import _Throttle


async def test_node_changes_wake_the_loop_at_most_once_per_gap_and_the_last_is_not_lost():
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    throttle = _Throttle(wake, gap_s=0.2)
    throttle()
    assert wake.is_set()  # the first change: at once
    wake.clear()
    started = loop.time()
    for _ in range(5):  # more within the gap: one wake, when the gap has passed
        throttle()
    assert not wake.is_set()
    await asyncio.wait_for(wake.wait(), 5)
    assert loop.time() - started >= 0.15
    wake.clear()
    throttle()
    throttle.cancel()  # a pending wake is dropped on shutdown
    assert throttle._timer is None and not wake.is_set()
