"""The janitor's rules: TTL expiry of queued jobs and result retention of terminal ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_proto.jobs import TERMINAL_STATUSES, JobPolicy, JobRecord
from runplane_scheduler.janitor import pause_s
from runplane_scheduler.janitor_rules import (Retention, payload_refs, retention_over, sweep, timed_out,
                                              ttl_expired)

NOW = 1_700_000_000_000
RETENTION = Retention(result_ms=1_800_000, sync_result_ms=60_000)
STATUSES = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]


def record(status: str = "IN_QUEUE", *, submitted_ago_ms: int = 0, ttl_ms: int = 86_400_000,
           completed_ago_ms: int | None = None, sync: bool = False, **kw: object) -> JobRecord:
    return JobRecord(
        id="j1", endpoint_id="ep1", status=status,  # type: ignore[arg-type]
        policy=JobPolicy(execution_timeout_ms=600_000, ttl_ms=ttl_ms), submitted_at_ms=NOW - submitted_ago_ms,
        completed_at_ms=None if completed_ago_ms is None else NOW - completed_ago_ms, sync=sync,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("status,submitted_ago_ms,ttl_ms,expired", [
    ("IN_QUEUE", 10_001, 10_000, True),
    ("IN_QUEUE", 10_000, 10_000, False),
    ("IN_QUEUE", 0, 10_000, False),
    ("IN_PROGRESS", 99_999, 10_000, False),
    ("COMPLETED", 99_999, 10_000, False),
])
def test_ttl_expiry_only_for_queued_jobs(status, submitted_ago_ms, ttl_ms, expired):
    r = record(status, submitted_ago_ms=submitted_ago_ms, ttl_ms=ttl_ms)
    assert ttl_expired(r, NOW) is expired
    assert (timed_out(r, NOW) is not None) is expired


def test_timed_out_record_names_the_ttl():
    new = timed_out(record(submitted_ago_ms=20_000, ttl_ms=10_000, webhook="http://x"), NOW)
    assert new is not None
    assert new.status == "TIMED_OUT" and new.completed_at_ms == NOW
    assert "TTL of 10000 ms" in (new.error or "")
    assert new.webhook == "http://x" and new.submitted_at_ms == NOW - 20_000


@pytest.mark.parametrize("status,completed_ago_ms,sync,gone", [
    ("COMPLETED", 1_800_001, False, True),
    ("COMPLETED", 1_800_000, False, False),
    ("FAILED", 60_001, False, False),
    ("FAILED", 60_001, True, True),
    ("CANCELLED", 59_000, True, False),
    ("TIMED_OUT", 3_600_000, False, True),
    ("IN_PROGRESS", 9_999_999, False, False),
    ("IN_QUEUE", 9_999_999, True, False),
])
def test_retention_from_completion(status, completed_ago_ms, sync, gone):
    r = record(status, completed_ago_ms=completed_ago_ms, sync=sync)
    assert retention_over(r, NOW, RETENTION) is gone


def test_retention_without_a_completion_time_counts_from_start_then_submit():
    r = record("CANCELLED", submitted_ago_ms=2_000_000)
    assert retention_over(r, NOW, RETENTION)
    started = JobRecord(**{**{f: getattr(r, f) for f in r.__struct_fields__}, "started_at_ms": NOW - 10})
    assert not retention_over(started, NOW, RETENTION)


def test_payload_refs():
    assert payload_refs(record()) == []
    assert payload_refs(record(input_ref="j1.input", output_ref="j1.output")) == ["j1.input", "j1.output"]
    # A failed job's input stays for its dead letter.
    assert payload_refs(record(status="FAILED", input_ref="j1.input", output_ref="j1.output")) == ["j1.output"]
    assert payload_refs(record(status="TIMED_OUT", input_ref="j1.input")) == []


def test_sweep_sorts_records_into_expire_and_delete():
    records = [
        ("ep1.a", record(submitted_ago_ms=20_000, ttl_ms=10_000)),
        ("ep1.b", record("COMPLETED", completed_ago_ms=2_000_000)),
        ("ep1.c", record("COMPLETED", completed_ago_ms=10)),
        ("ep1.d", record("IN_PROGRESS", submitted_ago_ms=20_000, ttl_ms=10_000)),
        ("ep1.e", record("FAILED", completed_ago_ms=61_000, sync=True)),
    ]
    plan = sweep(records, NOW, RETENTION)
    assert plan.expire == ["ep1.a"] and plan.delete == ["ep1.b", "ep1.e"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(STATUSES), st.integers(0, 10_000_000), st.integers(1, 10_000_000),
       st.one_of(st.none(), st.integers(0, 10_000_000)), st.booleans())
def test_a_record_is_never_both_expired_and_deleted_and_terminal_ones_never_expire(
        status, submitted_ago_ms, ttl_ms, completed_ago_ms, sync):
    r = record(status, submitted_ago_ms=submitted_ago_ms, ttl_ms=ttl_ms, completed_ago_ms=completed_ago_ms,
               sync=sync)
    plan = sweep([("k", r)], NOW, RETENTION)
    assert not (plan.expire and plan.delete)
    if status in TERMINAL_STATUSES:
        assert plan.expire == [] and timed_out(r, NOW) is None
    else:
        assert plan.delete == []
    assert sweep([("k", r)], NOW, RETENTION) == plan
    new = timed_out(r, NOW)
    if new is not None:  # what the janitor writes is terminal and never expires again
        assert timed_out(new, NOW) is None and not retention_over(new, NOW, RETENTION)


def test_passes_are_spaced_by_their_own_length_on_a_large_bucket() -> None:
    """A short pass waits the interval; a long one waits four times its length, so the
    janitor takes at most a fifth of the scheduler's time however many records there are."""
    assert pause_s(30.0, 0.5) == 30.0
    assert pause_s(30.0, 7.5) == 30.0
    assert pause_s(30.0, 20.0) == 80.0
    assert pause_s(1.0, 2.0) == 8.0
