"""Dead letters: jobs that ended FAILED or TIMED_OUT, kept per endpoint for a look and a replay.

Value of KV `rp-dead-letters`, key `<endpoint>.<job>`. Whoever writes a job's terminal FAILED /
TIMED_OUT record writes its dead letter right after (the same code path that counts the end
for /health), with a per-entry TTL: the dead-letter retention.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from runplane_proto.ids import EndpointId, JobId
from runplane_proto.jobs import JobAttempt, JobPolicy, JobRecord

DeadStatus = Literal["FAILED", "TIMED_OUT"]


class DeadLetterReplay(msgspec.Struct, frozen=True, kw_only=True):
    """A new job made from a dead letter's input (on the same or another endpoint)."""

    endpoint_id: EndpointId
    job_id: JobId
    replayed_at_ms: int


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    job_id: JobId
    endpoint_id: EndpointId
    status: DeadStatus
    # The final error (e.g. the handler's, "attempts exhausted", "execution timeout ...").
    error: str | None
    submitted_at_ms: int
    failed_at_ms: int
    policy: JobPolicy
    sync: bool = False
    # The input as the job had it: inline, or the object `<job>.input` in `rp-payloads` (kept
    # past the record's retention for a failed job; the object store's TTL bounds it).
    input_json: bytes | None = None
    input_ref: str | None = None
    extra_json: bytes | None = None
    webhook: str | None = None
    # Every attempt that ended, oldest first: worker, node, times and error.
    attempts: tuple[JobAttempt, ...] = ()
    retries: int = 0
    replays: tuple[DeadLetterReplay, ...] = ()


def is_dead(status: str) -> bool:
    return status in ("FAILED", "TIMED_OUT")


def dead_letter_of(record: JobRecord, *, now_ms: int) -> DeadLetter:
    """The dead letter of a record that just became FAILED or TIMED_OUT."""
    assert record.status in ("FAILED", "TIMED_OUT"), record.status
    return DeadLetter(
        job_id=record.id, endpoint_id=record.endpoint_id, status=record.status, error=record.error,
        submitted_at_ms=record.submitted_at_ms,
        failed_at_ms=record.completed_at_ms if record.completed_at_ms is not None else now_ms,
        policy=record.policy, sync=record.sync, input_json=record.input_json, input_ref=record.input_ref,
        extra_json=record.extra_json, webhook=record.webhook, attempts=record.attempt_log,
        retries=record.retries,
    )
