"""An endpoint's recent jobs (`/v1/endpoints/{id}/jobs`): status and timings, newest first,
as a client would see them (retention and TTL applied, nothing written)."""

from __future__ import annotations

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.jobs import JobRecord
from runplane_gateway.retention import is_gone, ttl_expired
from runplane_gateway.settings import GatewaySettings
from runplane_gateway.wire import JobSummary

MAX_LIMIT = 1000


def summary(record: JobRecord, now_ms: int) -> JobSummary:
    status = "TIMED_OUT" if ttl_expired(record, now_ms) else record.status
    delay_ms = execution_ms = None
    if record.started_at_ms is not None:
        delay_ms = max(0, record.started_at_ms - record.submitted_at_ms)
        ended_ms = record.completed_at_ms if record.completed_at_ms is not None else now_ms
        execution_ms = max(0, ended_ms - record.started_at_ms)
    return JobSummary(
        id=record.id, status=status, submittedAtMs=record.submitted_at_ms, startedAtMs=record.started_at_ms,
        completedAtMs=record.completed_at_ms, delayTime=delay_ms, executionTime=execution_ms,
        workerId=record.worker_id, nodeId=record.node_id, attempts=record.attempts, retries=record.retries,
        error=record.error, lowPriority=record.policy.low_priority, sync=record.sync,
    )


async def recent_jobs(bus: Bus, endpoint_id: str, settings: GatewaySettings, *, now_ms: int, limit: int,
                      status: str | None = None) -> list[JobSummary]:
    # O(jobs of the endpoint), like /health (see the known gaps in docs/architecture.md).
    found = []
    async for _, record in bus.jobs.items(subjects.endpoint_jobs_filter(endpoint_id)):
        if is_gone(record, now_ms, result_retention_s=settings.result_retention_s,
                   sync_result_retention_s=settings.sync_result_retention_s):
            continue
        view = summary(record, now_ms)
        if status is None or view.status == status:
            found.append(view)
    found.sort(key=lambda j: (j.submittedAtMs, j.id), reverse=True)
    return found[:limit]
