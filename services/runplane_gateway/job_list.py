"""An endpoint's recent jobs (`/v1/endpoints/{id}/jobs`): status and timings, newest first,
as a client would see them (retention and TTL applied, nothing written)."""

from __future__ import annotations

import heapq

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.jobs import JobRecord
from runplane_gateway.retention import is_gone, ttl_expired
from runplane_gateway.settings import GatewaySettings
from runplane_gateway.wire import JobSummary

MAX_LIMIT = 1000
PAGE = 1000


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
    """Reads the endpoint's records page by page and keeps only the newest `limit`: memory
    O(limit + page), time O(jobs of the endpoint) (there is no index by submit time)."""
    if limit <= 0:
        return []
    newest: list[tuple[int, str, JobSummary]] = []  # a min-heap of the `limit` newest
    held: set[str] = set()  # a key written during the read may come twice
    async for page in bus.jobs.pages(subjects.endpoint_jobs_filter(endpoint_id), page_size=PAGE):
        for _, record in page:
            if is_gone(record, now_ms, result_retention_s=settings.result_retention_s,
                       sync_result_retention_s=settings.sync_result_retention_s):
                continue
            view = summary(record, now_ms)
            if status is not None and view.status != status:
                continue
            if view.id in held:
                continue
            entry = (view.submittedAtMs, view.id, view)
            if len(newest) < limit:
                heapq.heappush(newest, entry)
                held.add(view.id)
            elif entry[:2] > newest[0][:2]:
                held.discard(heapq.heapreplace(newest, entry)[1])
                held.add(view.id)
    return [view for _, _, view in sorted(newest, key=lambda e: e[:2], reverse=True)]
