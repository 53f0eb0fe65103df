"""Job records as the gateway sees them: submit, read (with retention and TTL applied),
render, cancel, retry, purge and count. Every record write is compare-and-set.

Nothing here reads every record: counts come from the endpoint's queue consumer and the
JOBENDS stream, and purge drains the consumer (O(queued jobs) writes, one batch in memory)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from msgspec import UNSET, Raw
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.ids import is_valid_id
from runplane_proto.jobs import (
    EMBED_LIMIT_BYTES, INLINE_PAYLOAD_LIMIT_BYTES, CancelJob, JobPolicy, JobQueued, JobRecord, WebhookDue,
    is_terminal,
)
from runplane_proto.codec import Codec, DecodeError
from runplane_service.clock import Clock
from runplane_gateway import metrics
from runplane_gateway.errors import ApiError
from runplane_gateway.queue_depth import QueueDepths
from runplane_gateway.queue_position import QueuePlaces
from runplane_gateway.retention import is_gone, timed_out, ttl_expired
from runplane_gateway.settings import GatewaySettings
from runplane_gateway.wire import JobCounts, JobTimingsView, JobView, encoder
from runplane_proto.timings import phases

log = structlog.get_logger("runplane.gateway.jobs")

RETRYABLE = frozenset({"FAILED", "TIMED_OUT"})
# How many queue messages purge-queue takes (and records it changes) at once.
PURGE_BATCH = 256
# A queue message whose record is missing this soon after submission may still get it.
MISSING_RECORD_GRACE_MS = 10_000
_queued_codec: Codec[JobQueued] = Codec(JobQueued)


class Jobs:
    def __init__(self, bus: Bus, settings: GatewaySettings, clock: Clock) -> None:
        self.bus = bus
        self.settings = settings
        self.clock = clock
        # Endpoints whose consumer is known to take the low-priority queue (checked once).
        self._low_queue_ready: set[str] = set()
        self.depths = QueueDepths(bus)
        self.places = QueuePlaces(bus, now_ms=clock.now_ms)

    async def check_queue_cap(self, endpoint_id: str) -> None:
        """429 when the endpoint already has `queue_cap` jobs queued (a copy of the count at
        most 0.5 s old: no request per submit)."""
        await self.depths.check(endpoint_id, self.settings.queue_cap)

    # -- submit -------------------------------------------------------------------------------

    async def submit(
        self, spec: EndpointSpec, job_id: str, *, input_raw: bytes, sync: bool, policy: JobPolicy,
        webhook: str | None, extra_json: bytes | None,
    ) -> JobRecord:
        """Save the input, create the record IN_QUEUE and queue the job (both at once)."""
        if policy.low_priority:
            await self._low_queue(spec.id)
        if len(input_raw) > INLINE_PAYLOAD_LIMIT_BYTES:
            input_json, input_ref = await self.bus.payloads.save(job_id, "input", input_raw)
        else:
            input_json, input_ref = input_raw, None
        record = JobRecord(
            id=job_id, endpoint_id=spec.id, status="IN_QUEUE", policy=policy,
            submitted_at_ms=self.clock.now_ms(), sync=sync, input_json=input_json, input_ref=input_ref,
            extra_json=extra_json, webhook=webhook,
        )
        key = subjects.job_key(spec.id, job_id)
        small = input_ref is None and len(input_raw) + len(extra_json or b"") <= EMBED_LIMIT_BYTES
        queued = JobQueued(job_id=job_id, endpoint_id=spec.id, submitted_at_ms=record.submitted_at_ms,
                           low_priority=policy.low_priority, record=record if small else None)
        created, published = await asyncio.gather(
            self.bus.jobs.create(key, record),
            self.bus.publish_durable(subjects.job_queue(spec.id, low_priority=policy.low_priority), queued,
                                     msg_id=f"{job_id}:0"),
            return_exceptions=True,
        )
        if isinstance(created, BaseException) or isinstance(published, BaseException):
            # Half a job must not linger: an agent drops a message whose record never appears.
            failure = created if isinstance(created, BaseException) else published
            log.warning("submit failed", job_id=job_id, endpoint_id=spec.id, error=repr(failure))
            await _quietly(self.bus.jobs.delete(key))
            if not isinstance(published, BaseException):  # an agent could run it from the message
                await _quietly(self.bus.delete_queued(published))
            await _quietly(self.bus.payloads.delete(input_ref))
            raise ApiError(503, f"could not queue the job: {type(failure).__name__}")
        metrics.JOBS_SUBMITTED.labels("runsync" if sync else "run").inc()
        self.depths.added(spec.id)
        return record

    # -- read ---------------------------------------------------------------------------------

    async def read(self, endpoint_id: str, job_id: str) -> JobRecord | None:
        """The record as a client may see it: None when absent or past its retention; a queued
        job past its TTL is made TIMED_OUT first."""
        if not (is_valid_id(endpoint_id) and is_valid_id(job_id)):
            return None
        key = subjects.job_key(endpoint_id, job_id)
        got = await self.bus.jobs.get(key)
        if got is None:
            return None
        return await self.settle(got.value)

    async def settle(self, record: JobRecord) -> JobRecord | None:
        """Apply retention and TTL to a record just read (from KV or an event)."""
        now_ms = self.clock.now_ms()
        if self._gone(record, now_ms):
            return None
        if ttl_expired(record, now_ms):
            record = await self._expire(record, now_ms)
        return record

    async def view(self, record: JobRecord) -> bytes:
        """The job object (the /status body), output spliced in as raw JSON; a queued job's
        position and ETA (a few requests, however long the queue)."""
        output: Raw | Any = UNSET
        if record.output_json is not None:
            output = Raw(record.output_json)
        elif record.output_ref is not None:
            data = await self.bus.payloads.load(None, record.output_ref)
            if data is not None:
                output = Raw(data)
        delay_ms: int | Any = UNSET
        execution_ms: int | Any = UNSET
        if record.started_at_ms is not None:
            delay_ms = max(0, record.started_at_ms - record.submitted_at_ms)
            ended_ms = record.completed_at_ms if record.completed_at_ms is not None else self.clock.now_ms()
            execution_ms = max(0, ended_ms - record.started_at_ms)
        position: int | Any = UNSET
        eta_ms: int | Any = UNSET
        if record.status == "IN_QUEUE":
            place = await self.places.place(record.endpoint_id, record.submitted_at_ms)
            if place is not None:
                position = place.position
                eta_ms = place.eta_ms if place.eta_ms is not None else UNSET
        return encoder.encode(JobView(
            id=record.id, status=record.status, delayTime=delay_ms, executionTime=execution_ms,
            output=output,
            error=record.error if record.error is not None else UNSET,
            workerId=record.worker_id if record.worker_id is not None else UNSET,
            retries=record.retries if record.retries > 0 else UNSET,
            timings=self._timings(record), queuePosition=position, etaMs=eta_ms,
        ))

    def _timings(self, record: JobRecord) -> JobTimingsView:
        p = phases(record, self.clock.now_ms())
        return JobTimingsView(
            totalMs=p.total_ms, queuedMs=p.queued_ms, waitingForCapacityMs=_given(p.waiting_for_capacity_ms),
            workerStartMs=_given(p.worker_start_ms), workerStart=_given(p.start_kind),
            handlerMs=_given(p.handler_ms), resultUploadMs=_given(p.result_upload_ms))

    # -- changes ------------------------------------------------------------------------------

    async def cancel(self, endpoint_id: str, job_id: str) -> JobRecord | None:
        """Make a non-terminal job CANCELLED; a terminal one is returned unchanged."""
        record = await self.read(endpoint_id, job_id)
        if record is None or is_terminal(record.status):
            return record
        now_ms = self.clock.now_ms()

        def cancelled(r: JobRecord) -> JobRecord | None:
            if is_terminal(r.status):
                return None
            return msgspec.structs.replace(r, status="CANCELLED", completed_at_ms=now_ms)

        new, wrote = await self._change(_key(record), cancelled)
        if new is not None and wrote:
            metrics.JOBS_ENDED.labels("CANCELLED", "cancel").inc()
            await self.announce(new, cancel_reason="cancelled")
        return new

    async def retry(self, spec: EndpointSpec, job_id: str) -> JobRecord | None:
        """Queue a FAILED or TIMED_OUT job again under the same id (400 for any other state)."""
        record = await self.read(spec.id, job_id)
        if record is None:
            return None
        if record.status not in RETRYABLE:
            raise _not_retryable(job_id, record.status)
        if record.policy.low_priority:
            await self._low_queue(spec.id)
        now_ms = self.clock.now_ms()

        def requeue(r: JobRecord) -> JobRecord | None:
            if r.status not in RETRYABLE:
                return None
            return msgspec.structs.replace(
                r, status="IN_QUEUE", retries=r.retries + 1, attempts=0, submitted_at_ms=now_ms,
                started_at_ms=None, completed_at_ms=None, output_json=None, output_ref=None, error=None,
                worker_id=None, node_id=None,
            )

        new, wrote = await self._change(_key(record), requeue)
        if new is None:
            return None
        if not wrote:
            raise _not_retryable(job_id, new.status)
        low_priority = new.policy.low_priority
        queued = JobQueued(job_id=job_id, endpoint_id=spec.id, submitted_at_ms=now_ms,
                           low_priority=low_priority)
        await asyncio.gather(
            self.bus.publish_durable(subjects.job_queue(spec.id, low_priority=low_priority), queued,
                                     msg_id=f"{job_id}:{new.retries}"),
            self.bus.job_changed(new),
            self.bus.count_job_end(new, "retried"),
        )
        if record.output_ref is not None:
            await _quietly(self.bus.payloads.delete(record.output_ref))
        return new

    async def purge(self, endpoint_id: str) -> int:
        """Cancel every job queued on the endpoint (error "purged"); returns how many.

        Takes the messages from the endpoint's consumer as an agent would, a batch at a time,
        up to the last one queued when the purge began: a queued job's record becomes
        CANCELLED first and only then is its message acked, so a purge cut short (a killed
        gateway) loses nothing (the messages it held are redelivered after `ack_wait`).
        Messages of jobs that ended already (cancelled, expired) are acked too; a job that
        is not queued (redelivered while its record says it runs) is put back for the agents.
        """
        if (await self.depths.read(endpoint_id)).queued == 0:
            return 0
        last_seq = (await self.bus.js.stream_info(subjects.STREAM_JOBS)).state.last_seq
        sub = await self.bus.js.pull_subscribe_bind(consumer=subjects.job_consumer(endpoint_id),
                                                    stream=subjects.STREAM_JOBS)
        now_ms = self.clock.now_ms()
        removed = 0
        try:
            while True:
                try:
                    msgs = await sub.fetch(PURGE_BATCH, timeout=1.0)
                except (NatsTimeoutError, asyncio.TimeoutError, NotFoundError):
                    break
                results = await asyncio.gather(*(self._purge_message(m, last_seq, now_ms) for m in msgs))
                removed += results.count("purged")
                if not any(r in ("purged", "dropped") for r in results):
                    break  # only jobs queued since, or not ours to purge, are left
        finally:
            await _quietly(sub.unsubscribe())
            self.depths.cleared(endpoint_id)
        metrics.JOBS_ENDED.labels("CANCELLED", "purge").inc(removed)
        return removed

    async def _purge_message(self, msg: Msg, last_seq: int, now_ms: int) -> str:
        """One message taken by purge: "purged", "dropped" (acked, nothing to cancel), or
        "later" / "back" (nak'ed: queued after the purge began, or not queued)."""
        if msg.metadata.sequence.stream > last_seq:
            await msg.nak(delay=1.0)
            return "later"
        try:
            queued = _queued_codec.decode(msg.data)
        except DecodeError:
            await msg.term()  # garbage: the agents drop it too
            return "dropped"
        key = subjects.job_key(queued.endpoint_id, queued.job_id)

        def purged(r: JobRecord) -> JobRecord | None:
            if r.status != "IN_QUEUE":
                return None
            return msgspec.structs.replace(r, status="CANCELLED", error="purged", completed_at_ms=now_ms)

        try:
            new, wrote = await self._change(key, purged)
        except Exception as exc:
            log.warning("purge could not cancel a job", job_id=queued.job_id, error=repr(exc))
            await msg.nak(delay=1.0)
            return "back"
        if new is None:
            if abs(now_ms - queued.submitted_at_ms) < MISSING_RECORD_GRACE_MS:
                await msg.nak(delay=0.5)  # its record may be on its way
                return "later"
            await msg.ack()  # a submit that failed half-way: the agents would drop it too
            return "dropped"
        if wrote:
            await self.announce(new)
            await msg.ack()
            return "purged"
        if is_terminal(new.status):
            await msg.ack()
            return "dropped"
        await msg.nak()
        return "back"

    async def count(self, endpoint_id: str) -> JobCounts:
        """The /health job counts: queued and taken from the endpoint's consumer (one request),
        completed / failed / retried in the last 30 minutes from the JOBENDS stream's
        per-subject counts (one request), and while jobs wait the oldest one's age (the first
        message of each queue past the consumer's position: two requests), however many jobs
        there are."""
        queue, ends = await asyncio.gather(self.depths.read(endpoint_id), self._ends(endpoint_id))
        delay_ms = 0
        if queue.queued:  # the oldest message after the consumer's position (two requests)
            delay_ms = await self.places.queue_delay_ms(endpoint_id, queue.delivered_seq)
        return JobCounts(completed=ends.get("completed", 0), failed=ends.get("failed", 0),
                         inProgress=queue.taken, inQueue=queue.queued, retried=ends.get("retried", 0),
                         queueDelayMs=delay_ms)

    async def _ends(self, endpoint_id: str) -> dict[str, int]:
        try:
            info = await self.bus.js.stream_info(subjects.STREAM_JOB_ENDS,
                                                 subjects_filter=subjects.endpoint_job_ends_filter(endpoint_id))
        except NotFoundError:
            return {}
        return {subject.rsplit(".", 1)[-1]: n for subject, n in (info.state.subjects or {}).items()}

    async def announce(self, record: JobRecord, *, cancel_reason: str | None = None) -> None:
        """Tell the bus about a change this gateway made: the event, the agent's cancel,
        and the webhook when the job has one and is now terminal."""
        sends: list[Awaitable[Any]] = [
            self.bus.job_changed(record),
            self.bus.count_job_end(record),
        ]
        if cancel_reason is not None:
            sends.append(self.bus.publish(subjects.job_cancel(record.endpoint_id), CancelJob(
                job_id=record.id, endpoint_id=record.endpoint_id, reason=cancel_reason)))
        if record.webhook and is_terminal(record.status):
            sends.append(self.bus.publish_durable(subjects.webhook_due(record.endpoint_id), WebhookDue(
                job_id=record.id, endpoint_id=record.endpoint_id)))
        await asyncio.gather(*sends)

    # -- internals ----------------------------------------------------------------------------

    async def _low_queue(self, endpoint_id: str) -> None:
        """Before the first low-priority job of an endpoint: make sure its consumer takes the
        low-priority queue. A consumer made by an older version has only the normal queue, and
        once updated it would skip low-priority messages published behind its position."""
        if endpoint_id in self._low_queue_ready:
            return
        try:
            await self.bus.ensure_job_consumer(endpoint_id, ack_wait_s=self.settings.ack_wait_s)
        except Exception as exc:
            log.warning("could not check the job consumer", endpoint_id=endpoint_id, error=repr(exc))
            raise ApiError(503, f"could not queue the job: {type(exc).__name__}") from exc
        self._low_queue_ready.add(endpoint_id)

    def _gone(self, record: JobRecord, now_ms: int) -> bool:
        return is_gone(record, now_ms, result_retention_s=self.settings.result_retention_s,
                       sync_result_retention_s=self.settings.sync_result_retention_s)

    async def _expire(self, record: JobRecord, now_ms: int) -> JobRecord:
        new, wrote = await self._change(
            _key(record), lambda r: timed_out(r, now_ms) if ttl_expired(r, now_ms) else None)
        if new is None:  # deleted meanwhile (the janitor): report what we knew, expired
            return timed_out(record, now_ms)
        if wrote:
            metrics.JOBS_ENDED.labels("TIMED_OUT", "ttl").inc()
            await self.announce(new)
        return new

    async def _change(
        self, key: str, change: Callable[[JobRecord], JobRecord | None],
    ) -> tuple[JobRecord | None, bool]:
        """CAS `change` on the job's record; returns (the record now, whether we wrote it)."""
        wrote = False

        def tracked(r: JobRecord) -> JobRecord | None:
            nonlocal wrote
            new = change(r)
            wrote = new is not None
            return new

        result = await self.bus.jobs.modify(key, tracked)
        return (None, False) if result is None else (result.value, wrote)


def _given(value: Any) -> Any:
    return UNSET if value is None else value


def _not_retryable(job_id: str, status: str) -> ApiError:
    return ApiError(400, f"job {job_id} is {status}: only FAILED or TIMED_OUT jobs can be retried")


def _key(record: JobRecord) -> str:
    return subjects.job_key(record.endpoint_id, record.id)


async def _quietly(op: Awaitable[Any]) -> None:
    try:
        await op
    except Exception as exc:
        log.warning("cleanup failed", error=repr(exc))
