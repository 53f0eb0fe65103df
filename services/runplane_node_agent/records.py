"""Writing job records: compare-and-set from a known revision, then announcing the change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from nats.errors import MaxPayloadError

from runplane_bus import Bus, Conflict
from runplane_proto import subjects as s
from runplane_proto.jobs import JobRecord, WebhookDue, is_terminal

Change = Callable[[JobRecord], JobRecord | None]
T = TypeVar("T")
log = structlog.get_logger("runplane.node_agent.records")

# How long a record write is retried on NATS errors: a JetStream cluster electing a leader for
# the bucket after a server died takes a few seconds, and giving up meanwhile turns a finished
# job into one that runs again (the worker has nothing to retry with once its SDK gave up).
WRITE_RETRY_S = 15.0


class RecordWriter:
    def __init__(self, bus: Bus, retry_s: float = WRITE_RETRY_S) -> None:
        self.bus = bus
        self.retry_s = retry_s

    async def update(self, key: str, record: JobRecord, revision: int) -> int:
        """Compare-and-set, retried on NATS errors (not on Conflict) for up to `retry_s`."""
        tries = 0

        async def write() -> int:
            nonlocal tries
            tries += 1
            try:
                return await self.bus.jobs.update(key, record, revision)
            except Conflict:
                if tries > 1:  # an earlier try may have landed with its answer lost
                    current = await self.bus.jobs.get(key)
                    if current is not None and current.value == record:
                        return current.revision
                raise

        return await self._retrying(write, record.id)

    async def publish_durable(self, subject: str, msg: Any, *, msg_id: str, job_id: str) -> int:
        """Publish to JetStream, retried on NATS errors for up to `retry_s`; `msg_id` makes a
        repeat of a publish that landed with its answer lost harmless."""
        return await self._retrying(lambda: self.bus.publish_durable(subject, msg, msg_id=msg_id), job_id)

    async def _retrying(self, call: Callable[[], Awaitable[T]], job_id: str) -> T:
        """`call()`, again after NATS errors (never after Conflict) until `retry_s` has passed."""
        deadline = time.monotonic() + self.retry_s
        pause_s = 0.05
        while True:
            try:
                return await call()
            except (Conflict, MaxPayloadError):  # no retry changes these
                raise
            except Exception as exc:
                if time.monotonic() + pause_s > deadline:
                    raise
                log.info("job write retried", job_id=job_id, error=repr(exc))
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, 1.0)

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
                return new, await self.update(key, new, revision), True
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
        await self.bus.job_changed(new)
        await self.bus.count_job_end(new)
        if new.webhook and is_terminal(new.status):
            # Retried like the write: the record is terminal now, so nothing would send this again.
            await self.publish_durable(s.webhook_due(new.endpoint_id),
                                       WebhookDue(job_id=new.id, endpoint_id=new.endpoint_id),
                                       msg_id=f"{new.id}:{new.retries}", job_id=new.id)
        return new
