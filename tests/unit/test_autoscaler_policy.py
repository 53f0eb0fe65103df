"""The autoscaler's policy: tables of situations, then properties over random ones."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_autoscaler.policy import (
    PrioritySplit, QueueCounts, ScaleState, Signals, decide, initial_state, split_by_priority, state_of,
)
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
    ("low priority never scales from zero", spec(), Signals(low_in_queue=5), state(0), 0),
    ("low priority never scales from zero (QUEUE_DELAY)", spec(scaler_type="QUEUE_DELAY", scaler_value=1),
     Signals(low_in_queue=5), state(0, up=NOW - 60_000), 0),
    ("low priority is not demand", spec(), Signals(in_queue=1, low_in_queue=9, low_in_progress=2,
                                                   workers_busy=2), state(2), 2),
    ("request count counts normal jobs only", spec(), Signals(in_queue=2, low_in_queue=9), state(1), 2),
    ("low priority keeps the last worker", spec(), Signals(low_in_queue=1),
     state(1, active=NOW - 60_000, needed=NOW - 60_000), 1),
    ("low priority keeps busy workers", spec(), Signals(low_in_progress=2, workers_busy=2),
     state(2, active=NOW - 60_000, needed=NOW - 60_000), 2),
    ("low priority keeps no idle surplus", spec(), Signals(low_in_progress=1, workers_busy=1),
     state(3, active=NOW - 60_000, needed=NOW - 60_000), 2),
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


def test_low_priority_work_is_named_in_the_reason():
    target, _ = decide(spec(), Signals(low_in_queue=2, low_in_progress=1), state(0), NOW)
    assert target.desired_workers == 0 and "3 low-priority" in target.reason


def test_a_low_priority_job_waits_at_zero_until_normal_work_brings_a_worker():
    """RunPod's semantics over time: a low-priority job alone never starts a worker; it runs
    on the worker a normal job brought, which is then kept while low-priority work remains."""
    endpoint = spec(scaler_type="QUEUE_DELAY", scaler_value=1, idle_timeout_s=2)
    s: ScaleState | None = None
    t = NOW
    for _ in range(60):  # 30 s with one low-priority job waiting
        t += 500
        target, s = decide(endpoint, Signals(low_in_queue=1), s, t)
        assert target.desired_workers == 0, target.reason
    target, s = decide(endpoint, Signals(in_queue=1, low_in_queue=1), s, t + 500)
    assert target.desired_workers == 1
    t += 1_000
    for _ in range(20):  # the worker runs both, the low-priority one last
        t += 500
        target, s = decide(endpoint, Signals(low_in_progress=1, workers_total=1, workers_busy=1), s, t)
        assert target.desired_workers == 1
    done = t
    while target.desired_workers:
        t += 500
        target, s = decide(endpoint, Signals(workers_total=1, workers_idle=1), s, t)
    assert 2_000 <= t - done <= 3_000


SPLIT_CASES = [
    # (name, counts, expected (in_queue, in_progress, low_in_queue, low_in_progress))
    ("nothing", QueueCounts(), (0, 0, 0, 0)),
    ("normal only", QueueCounts(pending=3, ack_pending=2, normal_unacked=5, normal_waiting=True), (3, 2, 0, 0)),
    ("low only, waiting", QueueCounts(pending=4, normal_unacked=0), (0, 0, 4, 0)),
    ("low only, some running", QueueCounts(pending=4, ack_pending=2, low_running_reported=2), (0, 0, 4, 2)),
    ("mixed, exact reports", QueueCounts(pending=5, ack_pending=3, normal_unacked=4, normal_waiting=True,
                                         low_running_reported=1), (2, 2, 3, 1)),
    ("a low job just taken, not reported yet: fewer normal queued, never more",
     QueueCounts(pending=4, ack_pending=4, normal_unacked=4, normal_waiting=True, low_running_reported=1),
     (1, 3, 3, 1)),
    ("a low job finished, still reported: bounded by what is delivered",
     QueueCounts(pending=2, ack_pending=0, normal_unacked=1, normal_waiting=True, low_running_reported=3),
     (1, 0, 1, 0)),
    ("no normal job waits: none queued, whatever the counts",
     QueueCounts(pending=3, ack_pending=1, normal_unacked=1, normal_waiting=False), (0, 1, 3, 0)),
    ("a normal job waits behind low ones the reports missed",
     QueueCounts(pending=3, ack_pending=3, normal_unacked=1, normal_waiting=True, low_running_reported=0),
     (1, 0, 2, 3)),
    ("reads out of step: normal count above the consumer's",
     QueueCounts(pending=1, ack_pending=0, normal_unacked=2, normal_waiting=True), (1, 1, 0, 0)),
]


@pytest.mark.parametrize("name,counts,expected", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_by_priority_table(name, counts, expected):
    split = split_by_priority(counts)
    assert (split.in_queue, split.in_progress, split.low_in_queue, split.low_in_progress) == expected


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


# Low-priority work: properties of the split and of decide.

truths = st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50), st.integers(0, 50))


def counts_of(normal_queued: int, normal_running: int, low_queued: int, low_running: int,
              reported: int) -> QueueCounts:
    return QueueCounts(pending=normal_queued + low_queued, ack_pending=normal_running + low_running,
                       normal_unacked=normal_queued + normal_running, normal_waiting=normal_queued > 0,
                       low_running_reported=reported)


@settings(max_examples=400, deadline=None)
@given(truths)
def test_split_is_exact_when_the_counts_agree(truth):
    normal_queued, normal_running, low_queued, low_running = truth
    split = split_by_priority(counts_of(*truth, reported=low_running))
    assert split == PrioritySplit(in_queue=normal_queued, in_progress=normal_running, low_in_queue=low_queued,
                                  low_in_progress=low_running)


@settings(max_examples=400, deadline=None)
@given(truths, st.integers(0, 100))
def test_stale_reports_never_turn_low_priority_jobs_into_demand(truth, reported):
    """Whatever the agents report, the normal counts (all that can scale up) are the true ones
    in total, and a normal job counts as queued exactly when one waits."""
    normal_queued, normal_running, _, _ = truth
    split = split_by_priority(counts_of(*truth, reported=reported))
    assert split.in_queue + split.in_progress == normal_queued + normal_running
    assert (split.in_queue > 0) == (normal_queued > 0)
    assert min(split.in_queue, split.in_progress, split.low_in_queue, split.low_in_progress) >= 0


@settings(max_examples=300, deadline=None)
@given(st.integers(-5, 50), st.integers(-5, 50), st.integers(-5, 50), st.booleans(), st.integers(-5, 50))
def test_split_of_inconsistent_reads_stays_sane(pending, ack_pending, normal, waiting, reported):
    split = split_by_priority(QueueCounts(pending=pending, ack_pending=ack_pending, normal_unacked=normal,
                                          normal_waiting=waiting, low_running_reported=reported))
    assert min(split.in_queue, split.in_progress, split.low_in_queue, split.low_in_progress) >= 0
    assert split.in_queue + split.in_progress == max(0, normal)
    assert split.in_queue == 0 or waiting


@settings(max_examples=400, deadline=None)
@given(specs, signal_samples, states, st.integers(0, 100_000), st.integers(0, 100), st.integers(0, 50))
def test_low_priority_work_never_scales_up(endpoint, signals, previous, dt, low_queued, low_running):
    """Adding low-priority work never raises the target: any rise is one normal work alone
    would cause; low-priority work may only hold the count."""
    now = NOW + dt
    before = initial_state(endpoint, now) if previous is None else previous
    start = min(endpoint.workers_max, max(endpoint.workers_min, before.desired_workers))
    without, _ = decide(endpoint, signals, previous, now)
    low = msgspec.structs.replace(signals, low_in_queue=low_queued, low_in_progress=low_running)
    with_low, _ = decide(endpoint, low, previous, now)
    assert with_low.desired_workers <= max(without.desired_workers, start)
    if with_low.desired_workers > start:
        assert with_low.desired_workers == without.desired_workers


@settings(max_examples=200, deadline=None)
@given(specs, st.lists(st.tuples(st.integers(0, 100), st.integers(0, 20)), min_size=1, max_size=40))
def test_only_low_priority_work_keeps_an_endpoint_at_workers_min(endpoint, lows):
    s: ScaleState | None = None
    t = NOW
    for queued, running in lows:
        t += 500
        target, s = decide(endpoint, Signals(low_in_queue=queued, low_in_progress=running), s, t)
        assert target.desired_workers == endpoint.workers_min, target.reason


@pytest.mark.parametrize("kw, expected", [
    ({"prewarm_workers": 2}, 2),
    ({"prewarm_workers": 2, "flashboot": False}, 0),  # only flash endpoints can park
    ({"prewarm_workers": 9, "workers_max": 3}, 3),  # never beyond workersMax
    ({}, 0),
])
def test_the_target_carries_the_prewarm_count_whatever_the_worker_count(kw, expected):
    for signals in (Signals(), Signals(in_queue=3)):
        target, _ = decide(spec(**kw), signals, state(0), NOW)
        assert target.prewarm_workers == expected
    idle_target, _ = decide(spec(**kw), Signals(), state(0), NOW)
    assert idle_target.desired_workers == 0  # pre-warmed workers are not workers


def test_waiting_for_capacity_is_reported_and_never_asks_beyond_what_the_fleet_holds():
    reason = "no node has 1 free GPU(s) of ['H100']"
    waiting = Signals(in_queue=20, pending_workers=2, pending_reason=reason, capacity_workers=6)
    target, held = decide(spec(workers_max=50), waiting, state(3), NOW)
    assert target.desired_workers == 6 and "H100" in target.throttled and target.reason.startswith("throttled")
    assert "the fleet holds at most 6" in target.reason
    # What is already wanted is not taken back; a fleet with none of the GPUs adds none.
    target, _ = decide(spec(workers_max=50), msgspec.structs.replace(waiting, capacity_workers=0), state(3), NOW)
    assert target.desired_workers == 3
    # Capacity came (nothing pending): the demand counts again at once.
    target, _ = decide(spec(workers_max=50), Signals(in_queue=20), held, NOW + 500)
    assert target.desired_workers == 20 and target.throttled == ""
    # Scaling down is not held: surplus past the idle timeout still goes.
    quiet = Signals(pending_workers=1, pending_reason="x")
    target, _ = decide(spec(idle_timeout_s=1), quiet, state(3, needed=NOW - 5000, active=NOW - 5000), NOW)
    assert target.desired_workers == 2 and target.throttled.startswith("1 workers wait")
