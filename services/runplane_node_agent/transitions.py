"""How the node agent changes a job record: pure functions, no I/O, no clock."""

from __future__ import annotations

import enum

from msgspec.structs import replace
from runplane_proto.jobs import ATTEMPT_LOG_LIMIT, JobAttempt, JobRecord, JobStatus, is_terminal

# The error an attempt gets when its job was redelivered while its record said it ran: the
# agent holding it stopped renewing it (died, or lost NATS for longer than ack_wait).
LOST_ATTEMPT_ERROR = "lost: the node agent running it stopped renewing it (job redelivered)"


class Verdict(enum.Enum):
    RUN = "run"
    SKIP = "skip"  # terminal already (cancelled, purged, finished elsewhere)
    EXPIRED = "expired"  # waited in the queue past its TTL
    EXHAUSTED = "exhausted"  # taken too many times


def verdict(record: JobRecord, *, now_ms: int, max_attempts: int) -> Verdict:
    """What to do with a job whose queue message was just delivered."""
    if is_terminal(record.status):
        return Verdict.SKIP
    if record.status == "IN_QUEUE" and now_ms > record.submitted_at_ms + record.policy.ttl_ms:
        return Verdict.EXPIRED
    if record.attempts + 1 > max_attempts:
        return Verdict.EXHAUSTED
    return Verdict.RUN


def expired_error(record: JobRecord) -> str:
    return f"job expired in queue: ttl of {record.policy.ttl_ms} ms exceeded"


def exhausted_error(record: JobRecord, max_attempts: int) -> str:
    return f"attempts exhausted: taken {record.attempts} times, limit {max_attempts}"


def execution_timeout_error(timeout_ms: int) -> str:
    return f"execution timeout of {timeout_ms} ms exceeded"


def attempt_log(record: JobRecord, *, error: str | None, now_ms: int) -> tuple[JobAttempt, ...]:
    """The record's attempt log with its running attempt (if any) closed by `error`."""
    if record.status != "IN_PROGRESS" or record.attempts == 0:
        return record.attempt_log
    ended = JobAttempt(number=record.attempts, worker_id=record.worker_id, node_id=record.node_id,
                       started_at_ms=record.started_at_ms, ended_at_ms=now_ms, error=error)
    return (*record.attempt_log, ended)[-ATTEMPT_LOG_LIMIT:]


def in_progress(record: JobRecord, *, worker_id: str, node_id: str, now_ms: int) -> JobRecord:
    # Still IN_PROGRESS here means a redelivery: the attempt before was lost with its agent.
    return replace(record, status="IN_PROGRESS", worker_id=worker_id, node_id=node_id,
                   started_at_ms=now_ms, attempts=record.attempts + 1,
                   attempt_log=attempt_log(record, error=LOST_ATTEMPT_ERROR, now_ms=now_ms))


def finished(record: JobRecord, status: JobStatus, *, now_ms: int, output_json: bytes | None = None,
             output_ref: str | None = None, error: str | None = None, chunks: int | None = None,
             keep_output: bool = False, attempt_error: str | None = None) -> JobRecord | None:
    """The terminal record, or None when `record` is terminal already (it keeps its state).
    A running attempt is logged with `attempt_error` when given, else with `error`."""
    if is_terminal(record.status):
        return None
    if keep_output:
        output_json, output_ref = record.output_json, record.output_ref
    return replace(record, status=status, completed_at_ms=now_ms, output_json=output_json,
                   output_ref=output_ref, error=error,
                   chunks=record.chunks if chunks is None else chunks,
                   attempt_log=attempt_log(record, error=attempt_error or error, now_ms=now_ms))


def requeued(record: JobRecord, *, count_attempt: bool = True, error: str | None = None,
             now_ms: int = 0) -> JobRecord | None:
    """Back to the queue (its message is nak'ed). Without `count_attempt` the take is undone;
    with it, the attempt goes into the log with `error` (why it ended)."""
    if is_terminal(record.status):
        return None
    attempts = record.attempts if count_attempt else max(record.attempts - 1, 0)
    log = attempt_log(record, error=error, now_ms=now_ms) if count_attempt else record.attempt_log
    return replace(record, status="IN_QUEUE", worker_id=None, node_id=None, started_at_ms=None,
                   output_json=None, output_ref=None, attempts=attempts, attempt_log=log)


def with_progress(record: JobRecord, *, output_json: bytes | None,
                  output_ref: str | None) -> JobRecord | None:
    """A progress update sets `output` while the job runs and never touches a terminal record."""
    if record.status != "IN_PROGRESS":
        return None
    return replace(record, output_json=output_json, output_ref=output_ref)
