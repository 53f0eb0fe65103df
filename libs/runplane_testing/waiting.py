"""Wait by polling a condition, never by sleeping a fixed time and hoping."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.05,
               what: str = "condition") -> T:
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the thing may not be ready yet
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout_s}s (last error: {last_exc!r})")
        time.sleep(interval_s)


async def async_wait_until(check: Callable[[], Awaitable[T] | T], timeout_s: float = 10.0,
                           interval_s: float = 0.05, what: str = "condition") -> T:
    """Like wait_until inside a loop; `check` may be a coroutine function or a plain one."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout_s}s (last error: {last_exc!r})")
        await asyncio.sleep(interval_s)
