"""The thin control loop every decision-making service runs: step, sleep, never die."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable


async def every(
    interval_s: float, stop: asyncio.Event, step: Callable[[], Awaitable[object]], *,
    on_error: Callable[[Exception], None], observe_s: Callable[[float], None] | None = None,
    wake: asyncio.Event | None = None,
) -> None:
    """Run `step` every `interval_s` (minus the time it took) until `stop` is set.

    An exception from `step` goes to `on_error` (log it, count it) and the loop goes on.
    Setting `wake` runs the next step at once instead of at the end of the interval.
    """
    while not stop.is_set():
        started = time.monotonic()
        try:
            await step()
        except Exception as exc:  # the last line of defence: the loop must not die
            on_error(exc)
        elapsed = time.monotonic() - started
        if observe_s is not None:
            observe_s(elapsed)
        left = max(0.0, interval_s - elapsed)
        if wake is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), left)
            continue
        if not wake.is_set():
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        wake.clear()
