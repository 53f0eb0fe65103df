"""Writing job records: compare-and-set from a known revision, then announcing the change."""

from __future__ import annotations

from collections.abc import Callable

from runplane_bus import Bus, Conflict
from runplane_proto import subjects as s
from runplane_proto.jobs import JobChanged, JobRecord, WebhookDue, is_terminal

Change = Callable[[JobRecord], JobRecord | None]


class RecordWriter:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def cas(self, key: str, record: JobRecord, revision: int,
                   change: Change) -> tuple[JobRecord | None, int, bool]:
        """Compare-and-set from a known revision, re-reading on conflict.

        Returns (latest record or None if deleted, its revision, whether `change` was written).
        """
        for _ in range(20):
            new = change(record)
            if new is None:
                return record, revision, False
            try:
                return new, await self.bus.jobs.update(key, new, revision), True
            except Conflict:
                current = await self.bus.jobs.get(key)
                if current is None:
                    return None, 0, False
                record, revision = current.value, current.revision
        raise Conflict(key)

    async def conclude(self, key: str, record: JobRecord, revision: int,
                        change: Change) -> JobRecord | None:
        """Write a status change and announce it: JobChanged, the end's count for /health, then
        WebhookDue for a terminal record with a webhook. Returns the written record, None if
        nothing was written."""
        new, _, written = await self.cas(key, record, revision, change)
        if not written or new is None:
            return None
        await self.bus.publish(s.job_events(new.id), JobChanged(record=new))
        await self.bus.count_job_end(new)
        if new.webhook and is_terminal(new.status):
            await self.bus.publish_durable(s.webhook_due(new.endpoint_id),
                                           WebhookDue(job_id=new.id, endpoint_id=new.endpoint_id),
                                           msg_id=f"{new.id}:{new.retries}")
        return new
