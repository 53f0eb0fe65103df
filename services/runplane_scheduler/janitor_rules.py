"""What the janitor does to a job record: pure rules, time passed in.

The gateway applies the same rules when it reads a record, so a client never sees a
stale state between sweeps; keep the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from runplane_proto.jobs import JobRecord, is_terminal


class Retention(msgspec.Struct, frozen=True, kw_only=True):
    """How long a terminal record is kept, from its completion."""

    result_ms: int = 1_800_000
    sync_result_ms: int = 60_000


class Sweep(msgspec.Struct, frozen=True, kw_only=True):
    """What one pass over the records should do: KV keys to expire and to delete."""

    expire: list[str] = []
    delete: list[str] = []


def ttl_expired(record: JobRecord, now_ms: int) -> bool:
    """A queued job whose TTL ran out before any worker took it."""
    return record.status == "IN_QUEUE" and now_ms - record.submitted_at_ms > record.policy.ttl_ms


def timed_out(record: JobRecord, now_ms: int) -> JobRecord | None:
    """The compare-and-set change for an expired queued job: the TIMED_OUT record, with an
    error naming the TTL, or None when the record is (no longer) an expired queued job."""
    if not ttl_expired(record, now_ms):
        return None
    return msgspec.structs.replace(
        record, status="TIMED_OUT", completed_at_ms=now_ms,
        error=f"job expired in the queue: not started within its TTL of {record.policy.ttl_ms} ms",
    )


def retention_over(record: JobRecord, now_ms: int, retention: Retention) -> bool:
    """A terminal record kept longer than its result retention (`sync` jobs: the short one)."""
    if not is_terminal(record.status):
        return False
    ended_ms = record.completed_at_ms or record.started_at_ms or record.submitted_at_ms
    keep_ms = retention.sync_result_ms if record.sync else retention.result_ms
    return now_ms - ended_ms > keep_ms


def payload_refs(record: JobRecord) -> list[str]:
    """The object-store names to delete with a record. A FAILED / TIMED_OUT job's large input
    stays: its dead letter points at it (deleted with the dead letter, else by the object
    store's TTL)."""
    keep_input = record.status in ("FAILED", "TIMED_OUT")
    return [ref for ref in (None if keep_input else record.input_ref, record.output_ref) if ref]


def sweep(records: Iterable[tuple[str, JobRecord]], now_ms: int, retention: Retention) -> Sweep:
    expire: list[str] = []
    delete: list[str] = []
    for key, record in records:
        if ttl_expired(record, now_ms):
            expire.append(key)
        elif retention_over(record, now_ms, retention):
            delete.append(key)
    return Sweep(expire=expire, delete=delete)
