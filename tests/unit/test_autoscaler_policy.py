"""The autoscaler's policy: tables of situations, then properties over random ones."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_autoscaler.policy import ScaleState, Signals, decide, initial_state, state_of
from runplane_proto.endpoints import EndpointSpec

NOW = 1_000_000_000


def spec(**kw: object) -> EndpointSpec:
    base: dict[str, object] = {"id": "ep1", "name": "ep1", "workers_min": 0, "workers_max": 5,
                               "idle_timeout_s": 5, "scaler_type": "REQUEST_COUNT", "scaler_value": 1}
    base.update(kw)
    return EndpointSpec(**base)  # type: ignore[arg-type]


def state(desired: int, *, active: int = 0, needed: int = NOW, up: int = 0) -> ScaleState:
    return ScaleState(desired_workers=desired, last_active_at_ms=active, last_needed_at_ms=needed,
                      last_scale_up_at_ms=up)


CASES = [
    # (name, spec, signals, state, expected desired)
    ("new endpoint, no work: workersMin", spec(workers_min=1), Signals(), None, 1),
    ("scale from zero at once (REQUEST_COUNT)", spec(), Signals(in_queue=1), state(0), 1),
    ("scale from zero at once (QUEUE_DELAY)", spec(scaler_type="QUEUE_DELAY", scaler_value=4),
     Signals(in_queue=1, oldest_queued_age_ms=0), state(0), 1),
    ("request count: ceil((q+p)/N)", spec(scaler_value=2), Signals(in_queue=3, in_progress=2), state(1), 3),
    ("request count capped at workersMax", spec(workers_max=4), Signals(in_queue=50), state(1), 4),
    ("request count: nothing to add", spec(scaler_value=2), Signals(in_queue=1, in_progress=3), state(2), 2),
    ("queue delay: short wait holds", spec(scaler_type="QUEUE_DELAY", scaler_value=4),
     Signals(in_queue=9, oldest_queued_age_ms=3_000), state(2), 2),
    ("queue delay: long wait adds one", spec(scaler_type="QUEUE_DELAY", scaler_value=4),
     Signals(in_queue=9, oldest_queued_age_ms=4_001), state(2, up=NOW - 10_000), 3),
    ("queue delay: one per scalerValue seconds", spec(scaler_type="QUEUE_DELAY", scaler_value=4),
     Signals(in_queue=9, oldest_queued_age_ms=9_000), state(2, up=NOW - 1_000), 2),
    ("queue delay: in-progress work keeps one worker", spec(scaler_type="QUEUE_DELAY"),
     Signals(in_progress=1), state(0), 1),
    ("queue delay: never adds without a queue", spec(scaler_type="QUEUE_DELAY"),
     Signals(in_progress=4, workers_busy=1), state(1), 1),
    ("surplus shorter than idle timeout holds", spec(), Signals(), state(3, active=NOW - 1_000,
                                                                       needed=NOW - 1_000), 3),
    ("surplus past idle timeout: down by one", spec(), Signals(), state(3, active=NOW - 6_000,
                                                                       needed=NOW - 6_000), 2),
    ("partial surplus past idle timeout: down by one", spec(), Signals(in_progress=1),
     state(3, active=NOW, needed=NOW - 6_000), 2),
    ("never to zero right after work", spec(), Signals(), state(1, active=NOW - 1_000,
                                                                needed=NOW - 60_000), 1),
    ("to zero after idle timeout", spec(), Signals(), state(1, active=NOW - 5_000, needed=NOW - 5_000), 0),
    ("never below busy workers", spec(scaler_type="QUEUE_DELAY"), Signals(in_progress=0, workers_busy=3),
     state(3, active=NOW - 60_000, needed=NOW - 60_000), 3),
    ("never below workersMin", spec(workers_min=2), Signals(), state(2, active=0, needed=0), 2),
    ("a raised workersMin applies at once", spec(workers_min=3), Signals(), state(1), 3),
    ("a lowered workersMax applies at once", spec(workers_max=1), Signals(in_queue=9), state(4), 1),
    ("workersMax 0 keeps the endpoint off", spec(workers_max=0), Signals(in_queue=9), state(0), 0),
]


@pytest.mark.parametrize("name,endpoint,signals,previous,expected", CASES, ids=[c[0] for c in CASES])
def test_decide_table(name, endpoint, signals, previous, expected):
    target, new_state = decide(endpoint, signals, previous, NOW)
    assert target.desired_workers == expected, target.reason
    assert new_state.desired_workers == expected
    assert target.endpoint_id == endpoint.id and target.decided_at_ms == NOW and target.reason


def test_state_round_trips_through_the_target():
    target, new_state = decide(spec(), Signals(in_queue=2), state(0), NOW)
    assert state_of(target) == new_state
    assert new_state.last_active_at_ms == NOW and new_state.last_scale_up_at_ms == NOW


def test_a_burst_scales_up_then_down_one_at_a_time_after_the_idle_timeout():
    endpoint = spec(workers_min=1, idle_timeout_s=5)
    s: ScaleState | None = None
    t = NOW
    target, s = decide(endpoint, Signals(in_queue=4), s, t)
    assert target.desired_workers == 4
    t += 500
    target, s = decide(endpoint, Signals(in_progress=4, workers_busy=4), s, t)
    assert target.desired_workers == 4
    last_work = t
    counts = []
    while t < last_work + 20_000:
        t += 500
        target, s = decide(endpoint, Signals(workers_total=target.desired_workers,
                                             workers_idle=target.desired_workers), s, t)
        counts.append((t - last_work, target.desired_workers))
    assert all(n == 4 for dt, n in counts if dt < 5_000)
    downs = [dt for (dt, n), (_, m) in itertools.pairwise(counts) if m < n]
    assert len(downs) == 3 and counts[-1][1] == 1
    assert min(downs) >= 5_000 - 500


def test_steady_load_gives_a_flat_count():
    """Demand wobbling below the target never shrinks it within one idle timeout."""
    endpoint = spec(scaler_value=1, idle_timeout_s=5)
    s: ScaleState | None = None
    t = NOW
    seen = []
    for i in range(40):
        t += 500
        demand = 4 if i % 4 == 0 else 3
        target, s = decide(endpoint, Signals(in_progress=demand, workers_busy=demand), s, t)
        seen.append(target.desired_workers)
    assert seen[0] == 4 and set(seen) == {4}


# -- properties ------------------------------------------------------------------------------

specs = st.builds(
    lambda lo, extra, idle, scaler, value: spec(workers_min=lo, workers_max=lo + extra, idle_timeout_s=idle,
                                                 scaler_type=scaler, scaler_value=value),
    st.integers(0, 5), st.integers(0, 10), st.integers(0, 30),
    st.sampled_from(["QUEUE_DELAY", "REQUEST_COUNT"]), st.integers(0, 10),
)
signal_samples = st.builds(
    lambda q, p, age, busy, idle: Signals(in_queue=q, in_progress=p, oldest_queued_age_ms=age if q else 0,
                                          workers_total=busy + idle, workers_busy=busy, workers_idle=idle),
    st.integers(0, 100), st.integers(0, 50), st.integers(0, 60_000), st.integers(0, 20), st.integers(0, 20),
)
states = st.one_of(st.none(), st.builds(
    ScaleState, desired_workers=st.integers(0, 30), last_active_at_ms=st.integers(0, NOW),
    last_needed_at_ms=st.integers(0, NOW), last_scale_up_at_ms=st.integers(0, NOW)))


@settings(max_examples=400, deadline=None)
@given(specs, signal_samples, states, st.integers(0, 100_000))
def test_bounds_hold_and_same_input_gives_same_output(endpoint, signals, previous, dt):
    now = NOW + dt
    target, new_state = decide(endpoint, signals, previous, now)
    assert endpoint.workers_min <= target.desired_workers <= endpoint.workers_max
    assert decide(endpoint, signals, previous, now) == (target, new_state)
    assert state_of(target) == new_state


@settings(max_examples=300, deadline=None)
@given(specs, signal_samples, states, st.integers(0, 100_000))
def test_moves_are_bounded(endpoint, signals, previous, dt):
    """Down by at most one, never below busy workers or to zero with work; from zero when queued."""
    now = NOW + dt
    before = initial_state(endpoint, now) if previous is None else previous
    start = min(endpoint.workers_max, max(endpoint.workers_min, before.desired_workers))
    target, _ = decide(endpoint, signals, previous, now)
    if target.desired_workers < start:
        assert target.desired_workers == start - 1
        assert target.desired_workers >= min(signals.workers_busy, endpoint.workers_max)
    if signals.in_queue + signals.in_progress > 0 and endpoint.workers_max > 0:
        assert target.desired_workers >= 1


@settings(max_examples=200, deadline=None)
@given(specs, st.lists(signal_samples, min_size=1, max_size=30))
def test_a_sequence_stays_in_bounds_and_settles_at_min_when_idle(endpoint, samples):
    s: ScaleState | None = None
    t = NOW
    for sig in samples:
        t += 500
        target, s = decide(endpoint, sig, s, t)
        assert endpoint.workers_min <= target.desired_workers <= endpoint.workers_max
    for _ in range(200):  # long enough for any surplus to drain one step per tick
        t += (endpoint.idle_timeout_s + 1) * 1000
        target, s = decide(endpoint, Signals(), s, t)
    assert target.desired_workers == endpoint.workers_min
    assert msgspec.structs.asdict(s)["desired_workers"] == endpoint.workers_min
