"""The janitor: time out queued jobs past their TTL, delete records past their retention.

The rules are pure (`janitor_rules`); this module only reads the records and applies
the effects, each one idempotent and guarded by compare-and-set. A sweep reads the bucket a
page at a time and acts on each page before reading the next, so its memory is one page
however many jobs there are; its time is O(records) (there is no index by expiry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import contextlib
import time

import structlog
from nats.js.errors import APIError
from nats.js.kv import KeyValue

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.jobs import CancelJob, JobRecord, WebhookDue
from runplane_scheduler.janitor_rules import Retention, Sweep, payload_refs, retention_over, sweep, timed_out
from runplane_scheduler.metrics import ERRORS, JANITOR_DELETED, JANITOR_EXPIRED, JANITOR_SWEEPS
from runplane_service.clock import Clock

log = structlog.get_logger("runplane.scheduler.janitor")


async def delete_at_revision(kv: KeyValue, key: str, revision: int) -> bool:
    """Delete `key` only if it is still at `revision`; False if someone wrote it meanwhile."""
    try:
        await kv.delete(key, last=revision)
    except APIError as exc:
        if exc.err_code in (10071, 10164):  # wrong last sequence
            return False
        raise
    return True


# A pass reads every record (~20 us of CPU each): on a large bucket passes are spaced so that
# the janitor takes at most this share of the scheduler's time.
_MAX_BUSY_SHARE = 0.2


def pause_s(interval_s: float, pass_s: float) -> float:
    """The wait after a pass that took `pass_s`: the interval, or longer after a long pass
    (retention and queue TTLs are also applied by the gateway when it reads a record, so a
    later pass never shows a client a stale state)."""
    return max(interval_s, pass_s * (1 / _MAX_BUSY_SHARE - 1))


class Janitor:
    def __init__(self, bus: Bus, retention: Retention, *, interval_s: float = 5.0,
                 purge_deletes_every_s: float = 600.0, clock: Clock | None = None,
                 is_leader: Callable[[], bool] = lambda: True, page_size: int = 1000) -> None:
        self.bus = bus
        self.page_size = page_size
        self.is_leader = is_leader
        self.retention = retention
        self.interval_s = interval_s
        self.purge_deletes_every_s = purge_deletes_every_s
        self.clock = clock or Clock()
        self._last_purge = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        log.info("janitor running", interval_s=self.interval_s)
        while not stop.is_set():
            if not self.is_leader():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
                continue
            started = time.monotonic()
            try:
                await self.sweep_once(stop)
            except Exception as exc:
                ERRORS.labels(step="janitor sweep").inc()
                log.warning("janitor sweep failed", error=repr(exc))
            took_s = time.monotonic() - started
            if time.monotonic() - self._last_purge >= self.purge_deletes_every_s:
                self._last_purge = time.monotonic()
                try:
                    # Deleted records leave a marker each; drop the old ones so the bucket stays small.
                    await self.bus.jobs.kv.purge_deletes(olderthan=int(self.purge_deletes_every_s))
                except Exception as exc:
                    ERRORS.labels(step="janitor purge deletes").inc()
                    log.warning("purging delete markers failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=pause_s(self.interval_s, took_s))

    async def sweep_once(self, stop: asyncio.Event | None = None) -> tuple[int, int]:
        """One pass over every record, page by page (ended early by `stop`, so a shutdown
        does not wait for a long pass); returns (jobs timed out, records deleted)."""
        now_ms = self.clock.now_ms()
        expired = deleted = 0
        async for page in self.bus.jobs.pages(page_size=self.page_size):
            if stop is not None and stop.is_set():
                break
            page_expired, page_deleted = await self._apply(sweep(page, now_ms, self.retention), now_ms)
            expired += page_expired
            deleted += page_deleted
        JANITOR_SWEEPS.inc()
        return expired, deleted

    async def _apply(self, plan: Sweep, now_ms: int) -> tuple[int, int]:
        expired = deleted = 0
        for key in plan.expire:
            try:
                expired += await self.expire(key, now_ms)
            except Exception as exc:
                ERRORS.labels(step="janitor expire").inc()
                log.warning("could not time out job", key=key, error=repr(exc))
        for key in plan.delete:
            try:
                deleted += await self.delete(key, now_ms)
            except Exception as exc:
                ERRORS.labels(step="janitor delete").inc()
                log.warning("could not delete job record", key=key, error=repr(exc))
        return expired, deleted

    async def expire(self, key: str, now_ms: int) -> bool:
        """IN_QUEUE → TIMED_OUT (CAS), then tell whoever waits: events, webhook, cancel."""
        ours: list[JobRecord] = []

        def change(record: JobRecord) -> JobRecord | None:
            new = timed_out(record, now_ms)
            ours[:] = [new] if new is not None else []
            return new

        result = await self.bus.jobs.modify(key, change)
        if result is None or not ours or result.value is not ours[0]:
            return False  # gone, taken, or changed by someone else meanwhile
        record = result.value
        JANITOR_EXPIRED.inc()
        log.info("job timed out in queue", job_id=record.id, endpoint_id=record.endpoint_id,
                 ttl_ms=record.policy.ttl_ms)
        await self.bus.job_changed(record)  # a /runsync waiting for it hears it too
        await self.bus.count_job_end(record)
        if record.webhook:
            await self.bus.publish_durable(subjects.webhook_due(record.endpoint_id),
                                           WebhookDue(job_id=record.id, endpoint_id=record.endpoint_id),
                                           msg_id=f"{record.id}:{record.retries}")
        await self.bus.publish(subjects.job_cancel(record.endpoint_id), CancelJob(
            job_id=record.id, endpoint_id=record.endpoint_id, reason="ttl expired"))
        return True

    async def delete(self, key: str, now_ms: int) -> bool:
        """Delete a record past its retention (CAS, so a record retried meanwhile stays),
        then its payload objects and stream chunks."""
        current = await self.bus.jobs.get(key)
        if current is None or not retention_over(current.value, now_ms, self.retention):
            return False
        if not await delete_at_revision(self.bus.jobs.kv, key, current.revision):
            return False
        record = current.value
        for ref in payload_refs(record):
            await self.bus.payloads.delete(ref)
        if record.chunks:
            await self.bus.js.purge_stream(subjects.STREAM_CHUNKS, subject=subjects.job_chunks(record.id))
        JANITOR_DELETED.inc()
        log.debug("job record deleted", job_id=record.id, endpoint_id=record.endpoint_id)
        return True
