"""Where a job's time went: what the node agent notes on the job record, and the phases that
/status, the dashboard and the `rp_node_agent_job_*` histograms derive from it (pure).

Instants (ms since the epoch; the submit on the gateway's clock, the rest on the agent's):
submitted → hand-over → job-done → ended. Submitted → hand-over is split in three (they add up):

* **waiting for capacity**: the part of the wait before the process of the worker that took the
  job was started, when that worker was started after the submit (nothing of the endpoint could
  take the job: the autoscaler's decision, placement, a throttled GPU pool); else 0.
* **worker start**, named by `start_kind`: `cold` / `snapshot` (the worker's process became
  ready, i.e. polled for work the first time, after the submit: the part of its boot after the
  submit), `flash` (the worker was paused or parked when the job reached it: its resume), `warm`
  (it was running and ready: 0).
* **queued**: the rest of submit → hand-over (behind other jobs, dispatch).
* **hand-over**: the worker's take answered with the job (the worker SDK reports no handler start).
* **handler**: hand-over → the worker's job-done received by the agent.
* **result upload**: job-done received → the terminal record sent to KV (output stored inline or
  in the object store first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import msgspec

if TYPE_CHECKING:
    from runplane_proto.jobs import JobRecord

StartKind = Literal["cold", "snapshot", "flash", "warm"]
START_KINDS: tuple[str, ...] = ("cold", "snapshot", "flash", "warm")


class JobTimings(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's figures for the job's current attempt (`JobRecord.timings`): the first three
    with the claim write, the two instants with the terminal write (no write of their own)."""

    start_kind: StartKind = "warm"
    capacity_wait_ms: int = 0
    worker_start_ms: int = 0
    handed_over_at_ms: int | None = None
    handler_done_at_ms: int | None = None


def start_of(*, submitted_at_ms: int, spawned_at_ms: int, ready_at_ms: int, from_snapshot: bool,
             paused: bool) -> JobTimings:
    """What the taking worker's state says when a job is claimed (the flash resume is measured
    later and put in `worker_start_ms` then)."""
    if paused:
        return JobTimings(start_kind="flash")
    if ready_at_ms > submitted_at_ms:  # it booted while the job waited
        began_ms = max(spawned_at_ms, submitted_at_ms)
        return JobTimings(start_kind="snapshot" if from_snapshot else "cold",
                          capacity_wait_ms=max(0, spawned_at_ms - submitted_at_ms),
                          worker_start_ms=max(0, ready_at_ms - began_ms))
    return JobTimings()


class Phases(NamedTuple):
    """A job's time by phase (ms); None for a phase it has not reached or that cannot be known
    (a queued job's capacity wait, the upload of a job that ended without a result)."""

    total_ms: int
    queued_ms: int
    waiting_for_capacity_ms: int | None = None
    worker_start_ms: int | None = None
    start_kind: str | None = None
    handler_ms: int | None = None
    result_upload_ms: int | None = None


def phases(record: JobRecord, now_ms: int) -> Phases:
    """The phases of `record`'s latest attempt; a phase still running counts up to `now_ms`.
    They add up to `total_ms` (each is clamped at 0, so clocks that disagree can break that)."""
    submitted = record.submitted_at_ms
    ended = record.completed_at_ms
    total = max(0, (ended if ended is not None else now_ms) - submitted)
    if record.started_at_ms is None:  # still queued, or ended (cancelled, expired) before a take
        return Phases(total_ms=total, queued_ms=total)
    t = record.timings or JobTimings()
    handed = t.handed_over_at_ms if t.handed_over_at_ms is not None else record.started_at_ms
    wait = max(0, handed - submitted)
    capacity = min(t.capacity_wait_ms, wait)
    start = min(t.worker_start_ms, wait - capacity)
    queued = wait - capacity - start
    upload = None
    if t.handler_done_at_ms is not None:
        handler = max(0, t.handler_done_at_ms - handed)
        if ended is not None:
            upload = max(0, ended - t.handler_done_at_ms)
    else:
        handler = max(0, (ended if ended is not None else now_ms) - handed)
    return Phases(total_ms=total, queued_ms=queued, waiting_for_capacity_ms=capacity,
                  worker_start_ms=start, start_kind=t.start_kind if record.timings is not None else None,
                  handler_ms=handler, result_upload_ms=upload)
