"""Waiting for a job to finish: what /runsync does between queueing a job and answering.

The waiter subscribes to the job's core events subject before the job is published,
so no status change can slip by between the two.
"""

from __future__ import annotations

import asyncio

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


class SyncEnds:
    """The ends of this replica's /runsync jobs, over one subscription for its life.

    A /runsync record names the replica (`notify`: its token); whoever makes the record
    terminal also publishes the JobChanged on `rp.job.<token>.events`. So a /runsync costs
    no subscribe/unsubscribe on the bus, and the replica hears nothing of the job until its
    end. `expect` before the job is queued; `forget` when done waiting.
    """

    def __init__(self, nc: Client, token: str) -> None:
        self.nc = nc
        self.token = token
        self._waiting: dict[str, asyncio.Future[JobRecord]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> SyncEnds:
        self._sub = await self.nc.subscribe(subjects.job_events(self.token), cb=self._on_event,
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

    async def _on_event(self, msg: Msg) -> None:
        event = _decoded(msg)
        if not isinstance(event, JobChanged) or not is_terminal(event.record.status):
            return
        future = self._waiting.get(event.record.id)  # None: its wait already ran out
        if future is not None and not future.done():
            future.set_result(event.record)


async def wait_for_end(future: asyncio.Future[JobRecord], timeout_s: float) -> JobRecord | None:
    """The terminal record, or None when `timeout_s` runs out first."""
    if not future.done():
        await asyncio.wait((future,), timeout=timeout_s)
    return future.result() if future.done() and not future.cancelled() else None
