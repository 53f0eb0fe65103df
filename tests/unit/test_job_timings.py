"""The timing breakdown of a job (runplane_proto.timings): what the agent notes when a worker
takes a job, and the phases /status and the histograms derive from the record."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from runplane_proto.jobs import JobPolicy, JobRecord
from runplane_proto.timings import JobTimings, phases, start_of

POLICY = JobPolicy(execution_timeout_ms=0, ttl_ms=60_000)


def record(**kw) -> JobRecord:
    return JobRecord(id="j1", endpoint_id="ep", status=kw.pop("status", "COMPLETED"), policy=POLICY,
                     submitted_at_ms=1_000, **kw)


def test_a_worker_booted_for_the_job_is_a_cold_start_after_waiting_for_capacity():
    t = start_of(submitted_at_ms=1_000, spawned_at_ms=1_400, ready_at_ms=3_400, from_snapshot=False,
                 paused=False)
    assert t == JobTimings(start_kind="cold", capacity_wait_ms=400, worker_start_ms=2_000)


def test_a_boot_already_under_way_at_submit_counts_only_its_rest():
    t = start_of(submitted_at_ms=1_000, spawned_at_ms=500, ready_at_ms=1_800, from_snapshot=True, paused=False)
    assert t == JobTimings(start_kind="snapshot", capacity_wait_ms=0, worker_start_ms=800)


def test_a_ready_worker_is_warm_and_a_paused_one_flash():
    assert start_of(submitted_at_ms=1_000, spawned_at_ms=0, ready_at_ms=900, from_snapshot=False,
                    paused=False) == JobTimings(start_kind="warm")
    assert start_of(submitted_at_ms=1_000, spawned_at_ms=0, ready_at_ms=900, from_snapshot=False,
                    paused=True).start_kind == "flash"


def test_phases_of_a_finished_job_add_up():
    r = record(started_at_ms=3_400, completed_at_ms=5_050, timings=JobTimings(
        start_kind="cold", capacity_wait_ms=400, worker_start_ms=2_000, handed_over_at_ms=3_410,
        handler_done_at_ms=5_000))
    p = phases(r, now_ms=9_999)
    assert (p.waiting_for_capacity_ms, p.worker_start_ms, p.queued_ms, p.handler_ms, p.result_upload_ms) == (
        400, 2_000, 10, 1_590, 50)
    assert p.total_ms == 4_050 and p.start_kind == "cold"


def test_a_queued_job_is_all_queue_and_a_running_one_counts_up():
    assert phases(record(status="IN_QUEUE"), now_ms=1_700) == (700, 700, None, None, None, None, None)
    running = phases(record(status="IN_PROGRESS", started_at_ms=1_100, timings=JobTimings()), now_ms=2_000)
    assert running.handler_ms == 900 and running.queued_ms == 100 and running.result_upload_ms is None


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
       st.integers(0, 10**6), st.integers(0, 10**6))
def test_phases_never_go_negative_and_add_up_when_instants_are_ordered(capacity, start, wait, handler,
                                                                        upload, extra):
    handed = 1_000 + wait
    r = record(started_at_ms=handed - min(extra, wait), completed_at_ms=handed + handler + upload,
               timings=JobTimings(capacity_wait_ms=capacity, worker_start_ms=start, handed_over_at_ms=handed,
                                  handler_done_at_ms=handed + handler))
    p = phases(r, now_ms=0)
    parts = (p.queued_ms, p.waiting_for_capacity_ms, p.worker_start_ms, p.handler_ms, p.result_upload_ms)
    assert all(x is not None and x >= 0 for x in parts)
    assert sum(parts) == p.total_ms
