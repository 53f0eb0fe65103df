"""When a job record stops being visible (result retention) and when a queued job
expires (TTL): the rules the scheduler's janitor applies, applied again on every read
so a client never sees a stale state between sweeps. Pure functions."""

from __future__ import annotations

import msgspec

from runplane_proto.jobs import JobRecord, is_terminal


def retention_ms(record: JobRecord, *, result_retention_s: float, sync_result_retention_s: float) -> int:
    return int((sync_result_retention_s if record.sync else result_retention_s) * 1000)


def is_gone(record: JobRecord, now_ms: int, *, result_retention_s: float,
            sync_result_retention_s: float) -> bool:
    """A terminal record past its result retention: as good as deleted (404)."""
    if not is_terminal(record.status):
        return False
    ended_ms = record.completed_at_ms or record.started_at_ms or record.submitted_at_ms
    keep_ms = retention_ms(record, result_retention_s=result_retention_s,
                           sync_result_retention_s=sync_result_retention_s)
    return now_ms - ended_ms > keep_ms


def ttl_expired(record: JobRecord, now_ms: int) -> bool:
    """A queued job its TTL ran out on before any worker took it."""
    return record.status == "IN_QUEUE" and now_ms - record.submitted_at_ms > record.policy.ttl_ms


def timed_out(record: JobRecord, now_ms: int) -> JobRecord:
    """The record of a queued job that expired (TIMED_OUT, with an error naming the TTL)."""
    return msgspec.structs.replace(
        record, status="TIMED_OUT", completed_at_ms=now_ms,
        error=f"job expired in the queue: not started within its TTL of {record.policy.ttl_ms} ms",
    )
