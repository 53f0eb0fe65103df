"""Warm windows (`EndpointSpec.warm_windows`): when one is open, and what makes one unusable.

A window opens at each time its five-field cron expression names, in its IANA time zone
(daylight saving included), and stays open for `minutes`. Shared by the gateway (to refuse
an unusable window with a 400) and the autoscaler (to pre-warm while one is open).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from runplane_proto.endpoints import WarmWindow

MAX_WINDOW_MINUTES = 7 * 24 * 60


def window_problem(window: WarmWindow) -> str | None:
    """Why a warm window cannot be used (None: it can). For the gateway's 400s."""
    zone = _zone(window.timezone)
    if zone is None:
        return f"unknown time zone {window.timezone!r} (an IANA name such as \"Europe/Berlin\")"
    try:
        CronSim(window.cron, datetime(2026, 1, 1, tzinfo=zone))
    except (CronSimError, ValueError) as exc:
        return f"cron {window.cron!r} is not a five-field cron expression: {exc}"
    if not 1 <= window.minutes <= MAX_WINDOW_MINUTES:
        return f"minutes must be 1-{MAX_WINDOW_MINUTES} (got {window.minutes})"
    if window.workers < 1:
        return f"workers must be at least 1 (got {window.workers})"
    return None


def window_open(window: WarmWindow, now_ms: int) -> bool:
    """Whether the window is open at `now_ms`: its last opening (at or before this minute,
    in its time zone) was less than `minutes` ago. An unusable window is never open."""
    zone = _zone(window.timezone)
    if zone is None:
        return False
    now = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc)
    minute = now.replace(second=0, microsecond=0)
    opened = _last_opening(window.cron, window.timezone, int(minute.timestamp()))
    return opened is not None and now.timestamp() - opened < window.minutes * 60


@lru_cache(maxsize=4096)
def _last_opening(cron: str, zone_name: str, minute_s: int) -> float | None:
    """Epoch seconds of the latest time `cron` names at or before the minute `minute_s`
    (cached: the answer changes once a minute)."""
    zone = _zone(zone_name)
    if zone is None:
        return None
    start = datetime.fromtimestamp(minute_s, tz=timezone.utc).astimezone(zone) + timedelta(minutes=1)
    try:
        return next(iter(CronSim(cron, start, reverse=True))).timestamp()
    except (CronSimError, ValueError, StopIteration):
        return None


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
