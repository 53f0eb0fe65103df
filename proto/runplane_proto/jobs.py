"""Jobs: the record kept in KV `rp-jobs`, the queue message, events and chunks.

Inputs and outputs travel as raw JSON bytes (never re-encoded). When one is larger
than the inline limit it lives in the Object Store `rp-payloads` and the record
holds its object name instead (`*_ref`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from runplane_proto.ids import EndpointId, JobId, NodeId, WorkerId
from runplane_proto.timings import JobTimings

JobStatus = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})

# Payloads up to this size are stored inline in the job record (KV values must fit
# one NATS message, 1 MiB by default; a record may hold an input and an output).
INLINE_PAYLOAD_LIMIT_BYTES = 256 * 1024
# A job's queue message carries its submitted record when input and extra keys together are
# at most this big (the record is then stored twice: in KV and in the queue).
EMBED_LIMIT_BYTES = 64 * 1024


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


class JobPolicy(msgspec.Struct, frozen=True, kw_only=True):
    execution_timeout_ms: int
    ttl_ms: int
    low_priority: bool = False


class JobAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One run of a job that ended: on which worker and node, and how (`error` None: it
    completed). Kept on the record (`attempt_log`) so a dead letter can show every attempt."""

    number: int
    worker_id: WorkerId | None = None
    node_id: NodeId | None = None
    started_at_ms: int | None = None
    ended_at_ms: int | None = None
    error: str | None = None


# The attempt log keeps the newest this many attempts (across /retry too).
ATTEMPT_LOG_LIMIT = 20


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The state of one job, value of `rp-jobs` key `<endpoint>.<job>`.

    Writers use compare-and-set on the KV revision; a terminal record is never
    changed again except by `/retry` (FAILED/TIMED_OUT -> IN_QUEUE).
    """

    id: JobId
    endpoint_id: EndpointId
    status: JobStatus
    policy: JobPolicy
    submitted_at_ms: int
    sync: bool = False
    input_json: bytes | None = None
    input_ref: str | None = None
    # Raw JSON object with the submit body's other top-level keys handed to the
    # worker as-is (e.g. `s3Config`).
    extra_json: bytes | None = None
    webhook: str | None = None
    started_at_ms: int | None = None
    completed_at_ms: int | None = None
    worker_id: WorkerId | None = None
    node_id: NodeId | None = None
    attempts: int = 0
    retries: int = 0
    output_json: bytes | None = None
    output_ref: str | None = None
    error: str | None = None
    # Number of stream chunks the worker produced.
    chunks: int = 0
    # Attempts that ended, oldest first (at most ATTEMPT_LOG_LIMIT); the running one is not in it.
    attempt_log: tuple[JobAttempt, ...] = ()
    # Where the current attempt's time went (node agent; runplane_proto.timings).
    timings: JobTimings | None = None


class JobQueued(msgspec.Struct, frozen=True, kw_only=True, tag="job_queued"):
    """A message on stream JOBS, subject `rp.jobs.<endpoint>` (`rp.jobs.<endpoint>.low` when
    `low_priority`); acked when the job is terminal."""

    job_id: JobId
    endpoint_id: EndpointId
    submitted_at_ms: int
    low_priority: bool = False
    # The record as submitted, when its payloads are small (EMBED_LIMIT_BYTES): a node agent
    # hands a first delivery to a worker from it and checks the stored record while the
    # worker runs; a redelivery always reads the stored record first.
    record: JobRecord | None = None


class JobChanged(msgspec.Struct, frozen=True, kw_only=True, tag="job_changed"):
    """Published on `rp.job.<id>.events` after every status change, with the new record."""

    record: JobRecord


class ChunkAdded(msgspec.Struct, frozen=True, kw_only=True, tag="chunk_added"):
    """Published on `rp.job.<id>.events` after a stream chunk was stored."""

    job_id: JobId
    index: int


JobEvent = JobChanged | ChunkAdded


class StreamChunk(msgspec.Struct, frozen=True, kw_only=True, tag="stream_chunk"):
    """One generator output, stored on stream JOBCHUNKS, subject `rp.job.<id>.chunks`.

    `chunk_json` is the raw JSON object the client sees inside `stream`, e.g. `{"output": ...}`.
    """

    job_id: JobId
    index: int
    chunk_json: bytes


class CancelJob(msgspec.Struct, frozen=True, kw_only=True, tag="cancel_job"):
    """Published on `rp.endpoint.<endpoint>.cancel` once a job became CANCELLED (or was
    cut for any reason) so the node agent holding it stops the handler."""

    job_id: JobId
    endpoint_id: EndpointId
    reason: str = "cancelled"


class WebhookDue(msgspec.Struct, frozen=True, kw_only=True, tag="webhook_due"):
    """Published on stream WEBHOOKS by whoever made a job with a webhook terminal."""

    job_id: JobId
    endpoint_id: EndpointId


# How a job ended, as /health counts it (`completed`, `failed`, `retried`).
JobOutcome = Literal["completed", "failed", "retried"]


def outcome_of(status: str) -> JobOutcome | None:
    """The /health count a terminal status adds to (CANCELLED is counted nowhere)."""
    if status == "COMPLETED":
        return "completed"
    if status in ("FAILED", "TIMED_OUT"):
        return "failed"
    return None


class JobEnded(msgspec.Struct, frozen=True, kw_only=True, tag="job_ended"):
    """Published on stream JOBENDS (`rp.jobends.<endpoint>.<outcome>`) when a job ends or is
    retried. Nobody reads the messages: the stream's per-subject counts over its age window
    are /health's `completed`, `failed` and `retried`, one request for any number of jobs."""

    job_id: JobId
    endpoint_id: EndpointId
    outcome: JobOutcome
