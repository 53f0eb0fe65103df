"""Scheduled and predictive pre-warm: warm windows (cron, time zone, DST), the learned daily
load, and how the autoscaler's decision combines them with prewarmWorkers."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from runplane_autoscaler.policy import Signals, decide, initial_state
from runplane_autoscaler.prewarm import Profile, ProfileConfig, observe, predicted, prewarm_workers
from runplane_proto.endpoints import EndpointSpec, WarmWindow
from runplane_proto.windows import window_open, window_problem

DAY_MS = 86_400_000


def ms(*args: int, tz: str = "UTC") -> int:
    return int(datetime(*args, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def spec(**kw: object) -> EndpointSpec:
    base: dict[str, object] = {"id": "ep1", "name": "ep1", "workers_max": 5, "flashboot": True}
    base.update(kw)
    return EndpointSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("when, expected", [
    ((2026, 11, 27, 8, 59), False),   # Friday, before it opens (Berlin time)
    ((2026, 11, 27, 9, 0), True),     # the minute it opens
    ((2026, 11, 27, 10, 29), True),
    ((2026, 11, 27, 10, 30), False),  # 90 minutes later: closed
    ((2026, 11, 28, 9, 30), False),   # Saturday: not a weekday
])
def test_a_window_is_open_from_each_cron_time_for_its_minutes_in_its_time_zone(when, expected):
    window = WarmWindow(cron="0 9 * * 1-5", minutes=90, timezone="Europe/Berlin")
    assert window_open(window, ms(*when, tz="Europe/Berlin")) is expected


def test_a_window_follows_daylight_saving_time():
    window = WarmWindow(cron="0 9 * * *", minutes=30, timezone="Europe/Berlin")
    # 09:00 in Berlin is 07:00 UTC in summer and 08:00 UTC in winter.
    assert window_open(window, ms(2026, 7, 1, 7, 10))
    assert not window_open(window, ms(2026, 7, 1, 8, 10))
    assert window_open(window, ms(2026, 12, 1, 8, 10))
    assert not window_open(window, ms(2026, 12, 1, 7, 10))


def test_a_window_longer_than_a_day_spans_midnight():
    window = WarmWindow(cron="0 22 * * 5", minutes=3 * 24 * 60)  # Friday 22:00 to Monday 22:00
    assert window_open(window, ms(2026, 11, 29, 3, 0))  # Sunday
    assert not window_open(window, ms(2026, 11, 30, 22, 1))  # Monday, just after


@pytest.mark.parametrize("window, words", [
    (WarmWindow(cron="0 9 * *", minutes=10), "five-field"),
    (WarmWindow(cron="61 9 * * *", minutes=10), "five-field"),
    (WarmWindow(cron="0 9 * * *", minutes=10, timezone="Mars/Olympus"), "unknown time zone"),
    (WarmWindow(cron="0 9 * * *", minutes=0), "minutes"),
    (WarmWindow(cron="0 9 * * *", minutes=7 * 24 * 60 + 1), "minutes"),
    (WarmWindow(cron="0 9 * * *", minutes=10, workers=0), "workers"),
])
def test_unusable_windows_are_named_and_never_open(window, words):
    problem = window_problem(window)
    assert problem is not None and words in problem
    if words in ("five-field", "unknown time zone"):  # refused by the gateway; never open anyway
        assert not window_open(window, ms(2026, 11, 27, 9, 5))


def test_the_most_any_source_asks_for_wins_within_workers_max_and_only_for_flash_endpoints():
    open_now = WarmWindow(cron="* * * * *", minutes=5, workers=3)
    closed = WarmWindow(cron="0 3 * * *", minutes=5, workers=4)
    now = ms(2026, 11, 27, 12, 0)
    config = ProfileConfig()
    assert prewarm_workers(spec(prewarm_workers=1), now, Profile(), config) == (1, "prewarmWorkers")
    count, why = prewarm_workers(spec(prewarm_workers=1, warm_windows=[closed, open_now]), now, Profile(), config)
    assert count == 3 and "warm window 1" in why
    assert prewarm_workers(spec(warm_windows=[open_now], workers_max=2), now, Profile(), config)[0] == 2
    assert prewarm_workers(spec(warm_windows=[open_now], flashboot=False), now, Profile(), config)[0] == 0
    assert prewarm_workers(spec(warm_windows=[closed]), now, Profile(), config)[0] == 0


def test_a_daily_load_is_learned_and_prewarmed_ahead_and_fades_when_it_stops():
    config = ProfileConfig(slot_s=900, lead_s=900, alpha=0.3)
    rush = ms(2026, 11, 1, 9, 0)  # 09:00-09:15 every day: 3 workers wanted
    profile = Profile()

    def day(profile: Profile, start_ms: int, busy: bool) -> Profile:
        for minute in range(0, 24 * 60, 5):
            t = start_ms + minute * 60_000
            wanted = 3 if busy and rush % DAY_MS <= t % DAY_MS < rush % DAY_MS + 900_000 else 0
            profile = observe(profile, t, wanted, config)
        return profile

    before = rush - 10 * 60_000  # 08:50: the rush is one lead time (15 min) ahead
    midnight = rush - rush % DAY_MS
    days = [predicted(profile := day(profile, midnight + d * DAY_MS, True), before + (d + 1) * DAY_MS, config)
            for d in range(6)]
    assert days[0] == 1 and days == sorted(days) and days[-1] == 3  # learned over the days
    assert predicted(profile, rush + 3 * 3600_000, config) == 0  # nothing at noon
    for d in range(6, 14):  # the rush stops recurring: it fades out
        profile = day(profile, midnight + d * DAY_MS, False)
    assert predicted(profile, before + 14 * DAY_MS, config) == 0


def test_decide_persists_the_profile_and_pre_warms_from_it_at_zero_workers():
    config = ProfileConfig(period_s=60, slot_s=10, lead_s=10)
    endpoint = spec(predictive_prewarm=True)
    state = initial_state(endpoint, 0)
    t = 1_000_000_020_000  # phase 20 s of a 60 s period: slot 2
    for period in range(3):
        base = t + period * 60_000
        for offset_s, queued in ((0, 1), (5, 1), (12, 0), (30, 0), (45, 0)):
            target, state = decide(endpoint, Signals(in_queue=queued), state, base + offset_s * 1000, config)
    assert target.load_profile == state.profile.load and len(target.load_profile) == 6
    # Ten seconds before slot 2 of the next period, with nothing queued: pre-warmed, at zero workers.
    ahead, _ = decide(endpoint, Signals(), state, t + 3 * 60_000 - 10_000 + 1, config)
    assert ahead.desired_workers == 0 and ahead.prewarm_workers == 1 and "predicted" in ahead.reason
    off, _ = decide(spec(predictive_prewarm=False), Signals(), state, t + 3 * 60_000 - 10_000 + 1, config)
    assert off.prewarm_workers == 0


def test_a_slot_never_seen_or_a_profile_of_another_size_predicts_nothing():
    assert predicted(Profile(), 0, ProfileConfig()) == 0
    assert predicted(Profile(load=[5.0] * 3), 0, ProfileConfig()) == 0
    grown = observe(Profile(load=[5.0] * 3, slot=1, peak=2), 0, 1, ProfileConfig())
    assert len(grown.load) == ProfileConfig().slots


def test_timestamps_are_utc_epoch_milliseconds():
    assert ms(2026, 1, 1, 0, 0) == int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
