"""How many workers a flash endpoint keeps pre-warmed now: pure functions of its spec, the
time and its learned daily load.

Three sources, the largest wins (always within workersMax, and only for flash endpoints):

* `prewarmWorkers`: a fixed number at any time;
* warm windows: `{"cron", "minutes", "workers", "timezone"}`: a window is open from each time
  its cron expression names (in its time zone, daylight saving included) for `minutes`;
* predictive (`predictivePrewarm`): the day is cut into slots (`ProfileConfig.slot_s`, 15
  minutes); for each slot the autoscaler keeps a decaying average of the most workers the
  endpoint wanted in it (`observe`), and keeps pre-warmed, one lead time ahead, what the
  average for the coming slot rounds to. A load that recurs daily is thus met by flash
  starts; one that stops recurring fades out within a few days.
"""

from __future__ import annotations

import math

import msgspec

from runplane_proto.endpoints import EndpointSpec
from runplane_proto.windows import window_open


class ProfileConfig(msgspec.Struct, frozen=True, kw_only=True):
    # The period that recurs (a day) and the slots it is cut into.
    period_s: int = 86_400
    slot_s: int = 900
    # How far ahead the coming load is pre-warmed for.
    lead_s: int = 900
    # Weight of the latest observation of a slot in its average (about 1/alpha days of memory).
    alpha: float = 0.3

    @property
    def slots(self) -> int:
        return max(1, self.period_s // max(1, self.slot_s))


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """The learned load (persisted in the ScaleTarget)."""

    load: list[float] = []
    slot: int = -1
    peak: int = 0


def slot_of(now_ms: int, config: ProfileConfig) -> int:
    return (now_ms // 1000 % config.period_s) // max(1, config.slot_s) % config.slots


def observe(profile: Profile, now_ms: int, wanted: int, config: ProfileConfig) -> Profile:
    """Record that the endpoint wants `wanted` workers now. When a new slot begins, the peak
    of the slot that ended is folded into that slot's average."""
    slot = slot_of(now_ms, config)
    load = list(profile.load) if len(profile.load) == config.slots else [0.0] * config.slots
    if profile.slot == slot:
        return Profile(load=profile.load if load == profile.load else load, slot=slot,
                       peak=max(profile.peak, wanted))
    if 0 <= profile.slot < config.slots:
        before = load[profile.slot]
        load[profile.slot] = round((1 - config.alpha) * before + config.alpha * profile.peak, 4)
    return Profile(load=load, slot=slot, peak=max(0, wanted))


def predicted(profile: Profile, now_ms: int, config: ProfileConfig) -> int:
    """Workers the learned load asks for one lead time from now (its slot's average, rounded)."""
    if len(profile.load) != config.slots:
        return 0
    coming = slot_of(now_ms + config.lead_s * 1000, config)
    return math.floor(profile.load[coming] + 0.5)


def prewarm_workers(spec: EndpointSpec, now_ms: int, profile: Profile,
                    config: ProfileConfig) -> tuple[int, str]:
    """(workers to keep pre-warmed, why) for `spec` at `now_ms`."""
    if not spec.flashboot:
        return 0, ""
    high = max(0, spec.workers_min, spec.workers_max)
    best, why = max(0, spec.prewarm_workers), "prewarmWorkers" if spec.prewarm_workers > 0 else ""
    for i, window in enumerate(spec.warm_windows):
        if window.workers > best and window_open(window, now_ms):
            best, why = window.workers, f"warm window {i} ({window.cron} {window.timezone})"
    if spec.predictive_prewarm:
        learned = predicted(profile, now_ms, config)
        if learned > best:
            best, why = learned, "predicted from the daily load"
    return min(best, high), why
