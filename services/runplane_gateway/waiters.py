"""Waiting for a job to finish: what /runsync does between queueing a job and answering.

The waiter subscribes to the job's core events subject before the job is published,
so no status change can slip by between the two.
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from runplane_proto import subjects
from runplane_proto.codec import Codec, DecodeError
from runplane_proto.jobs import JobChanged, JobEvent, JobRecord, is_terminal
from runplane_gateway import metrics

log = structlog.get_logger("runplane.gateway.waiters")

_event_codec: Codec[JobEvent] = Codec(JobEvent)


def _decoded(msg: Msg) -> JobEvent | None:
    """A job event, or None (counted and logged) when it does not decode."""
    try:
        return _event_codec.decode(msg.data)
    except DecodeError as exc:
        metrics.DROPPED.labels("job events").inc()
        log.warning("dropped undecodable event", subject=msg.subject, error=str(exc))
        return None


class JobWaiter:
    """`async with JobWaiter(nc, job_id) as w: ...publish...; record = await w.wait(s)`."""

    def __init__(self, nc: Client, job_id: str) -> None:
        self.nc = nc
        self.job_id = job_id
        self.subject = subjects.job_events(job_id)
        self.latest: JobRecord | None = None
        self._done: asyncio.Future[JobRecord] = asyncio.get_running_loop().create_future()
        self._sub: Subscription | None = None

    async def __aenter__(self) -> JobWaiter:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_event)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # connection closing: the subscription goes with it
                pass

    async def wait(self, timeout_s: float) -> JobRecord | None:
        """The terminal record, or None when `timeout_s` runs out first."""
        return await wait_for_end(self._done, timeout_s)

    async def _on_event(self, msg: Msg) -> None:
        event = _decoded(msg)
        if isinstance(event, JobChanged):
            record = event.record
            if record.id != self.job_id:  # never answer with another job's record
                metrics.DROPPED.labels("job events").inc()
                log.warning("dropped event of another job", subject=msg.subject, job_id=record.id)
                return
            # A late or duplicate event must not move the view backwards.
            if self.latest is None or not is_terminal(self.latest.status):
                self.latest = record
            if is_terminal(record.status) and not self._done.done():
                self._done.set_result(record)


class _Status(msgspec.Struct):
    """The status alone of a stored job record (the rest is not decoded)."""

    status: str


_status_decoder = msgspec.msgpack.Decoder(_Status)
_record_codec: Codec[JobRecord] = Codec(JobRecord)


class SyncEnds:
    """The ends of this replica's /runsync jobs, over one subscription for its life.

    A /runsync job's id ends with the replica's token (`ids.new_job_id`), and KV rp-jobs
    republishes every write of a record to a subject ending with the last part of the job id
    (`subjects.gateway_job_records`). So the replica hears its jobs' records from the store
    itself, whoever wrote them (agent, cancel, janitor): no subscribe/unsubscribe per request,
    and the end does not wait for its writer to hear the store's ack and announce it.
    `expect` before the job is queued; `forget` when done waiting.
    """

    def __init__(self, nc: Client, token: str) -> None:
        self.nc = nc
        self.token = token
        self._waiting: dict[str, asyncio.Future[JobRecord]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> SyncEnds:
        self._sub = await self.nc.subscribe(subjects.gateway_job_records(self.token), cb=self._on_record,
                                            pending_msgs_limit=65536)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # connection closing: the subscription goes with it
                pass
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    def expect(self, job_id: str) -> asyncio.Future[JobRecord]:
        future: asyncio.Future[JobRecord] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = future
        return future

    def forget(self, job_id: str) -> None:
        self._waiting.pop(job_id, None)

    async def _on_record(self, msg: Msg) -> None:
        if msg.headers and "KV-Operation" in msg.headers:  # a delete or purge marker
            return
        try:
            if not is_terminal(_status_decoder.decode(msg.data).status):
                return  # the record as submitted, or claimed: only the end is awaited
            record = _record_codec.decode(msg.data)
        except DecodeError as exc:
            metrics.DROPPED.labels("job records").inc()
            log.warning("dropped undecodable job record", subject=msg.subject, error=str(exc))
            return
        future = self._waiting.get(record.id)  # None: its wait already ran out
        if future is not None and not future.done():
            future.set_result(record)


async def wait_for_end(future: asyncio.Future[JobRecord], timeout_s: float) -> JobRecord | None:
    """The terminal record, or None when `timeout_s` runs out first."""
    if not future.done():
        await asyncio.wait((future,), timeout=timeout_s)
    return future.result() if future.done() and not future.cancelled() else None
