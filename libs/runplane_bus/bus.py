"""One NATS connection per service, with JetStream, typed buckets and safe subscriptions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext
from prometheus_client import Counter

from runplane_bus.payloads import Payloads
from runplane_bus.records import TypedKV
from runplane_bus.topology import delete_job_consumer, ensure_job_consumer, ensure_topology
from runplane_proto import subjects as s
from runplane_proto.codec import Codec, DecodeError, encode
from runplane_proto.dead_letters import DeadLetter, dead_letter_of, is_dead
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.jobs import JobChanged, JobEnded, JobOutcome, JobRecord, outcome_of
from runplane_proto.leases import Lease
from runplane_proto.nodes import NodeStatus
from runplane_proto.scaling import PlacementStatus, ScaleTarget

T = TypeVar("T")
log = structlog.get_logger("runplane.bus")

DROPPED = Counter("rp_bus_dropped_messages_total", "Messages that failed to decode and were dropped",
                  ["subject"])


DEAD_LETTERS_LOST = Counter("rp_bus_dead_letters_lost_total",
                            "FAILED / TIMED_OUT jobs whose dead letter could not be written")

# How long close() lets in-flight messages finish before closing anyway.
DRAIN_TIMEOUT_S = 2.0


class BusSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str = "nats://127.0.0.1:4222"
    name: str = "runplane"
    replicas: int = 1
    # Credentials, at most one kind: a .creds file (JWT + nkey seed), user and password, or a token.
    user_credentials: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    # Where replies to this connection's requests arrive; a per-service prefix lets the
    # server's permissions keep one service from reading another's replies.
    inbox_prefix: str = "_INBOX"
    request_timeout_s: float = 5.0
    # How long a dead letter (a FAILED / TIMED_OUT job) is kept: the TTL its writer gives it.
    dead_letter_retention_s: float = 7 * 86_400.0


class Bus:
    """The single way a service talks to NATS."""

    def __init__(self, nc: Client, js: JetStreamContext, settings: BusSettings) -> None:
        self.nc = nc
        self.js = js
        self.settings = settings
        self.jobs: TypedKV[JobRecord]
        self.endpoints: TypedKV[EndpointSpec]
        self.nodes: TypedKV[NodeStatus]
        self.scale: TypedKV[ScaleTarget]
        self.leases: TypedKV[Lease]
        self.placement: TypedKV[PlacementStatus]
        self.dead_letters: TypedKV[DeadLetter]
        self.payloads: Payloads
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    async def connect(cls, settings: BusSettings) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc))

        async def on_disconnect() -> None:
            log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected")

        options: dict[str, Any] = dict(
            servers=settings.url.split(","), name=settings.name, max_reconnect_attempts=-1,
            reconnect_time_wait=0.5, connect_timeout=5, error_cb=on_error,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, allow_reconnect=True,
        )
        if settings.user_credentials:
            options["user_credentials"] = settings.user_credentials
        if settings.user:
            options.update(user=settings.user, password=settings.password or "")
        if settings.token:
            options["token"] = settings.token
        if settings.inbox_prefix != "_INBOX":
            options["inbox_prefix"] = settings.inbox_prefix
        nc = await _connect_with_retry(options)
        js = nc.jetstream(timeout=settings.request_timeout_s)
        bus = cls(nc, js, settings)
        await bus._open()
        return bus

    async def _open(self) -> None:
        for attempt in range(50):
            try:
                await ensure_topology(self.js, replicas=self.settings.replicas)
                break
            except Exception as exc:  # JetStream not ready yet (cluster electing a leader)
                if attempt == 49:
                    raise
                log.info("waiting for jetstream", error=repr(exc))
                await asyncio.sleep(0.2)
        self.jobs = TypedKV(await self.js.key_value(s.KV_JOBS), JobRecord)
        self.endpoints = TypedKV(await self.js.key_value(s.KV_ENDPOINTS), EndpointSpec)
        self.nodes = TypedKV(await self.js.key_value(s.KV_NODES), NodeStatus)
        self.scale = TypedKV(await self.js.key_value(s.KV_SCALE), ScaleTarget)
        self.leases = TypedKV(await self.js.key_value(s.KV_LEASES), Lease)
        self.placement = TypedKV(await self.js.key_value(s.KV_PLACEMENT), PlacementStatus)
        self.dead_letters = TypedKV(await self.js.key_value(s.KV_DEAD_LETTERS), DeadLetter)
        self.payloads = Payloads(await self.js.object_store(s.OBJ_PAYLOADS))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        try:
            # Bounded: a pull subscription whose fetches never complete would hold drain forever.
            await asyncio.wait_for(self.nc.drain(), DRAIN_TIMEOUT_S)
        except Exception:
            await self.nc.close()

    async def ensure_job_consumer(self, endpoint_id: str, *, ack_wait_s: float = 30.0) -> None:
        await ensure_job_consumer(self.js, endpoint_id, ack_wait_s=ack_wait_s)

    async def delete_job_consumer(self, endpoint_id: str) -> None:
        await delete_job_consumer(self.js, endpoint_id)

    async def kv(self, bucket: str) -> Any:
        return await self.js.key_value(bucket)

    async def publish(self, subject: str, msg: Any) -> None:
        """Fire-and-forget on a core subject."""
        await self.nc.publish(subject, encode(msg))

    async def job_changed(self, record: JobRecord) -> None:
        """Announce a record just written: JobChanged on the job's events subject. (A /runsync
        gateway replica hears its jobs' records from KV rp-jobs itself: topology.)"""
        await self.nc.publish(s.job_events(record.id), encode(JobChanged(record=record)))

    async def publish_durable(self, subject: str, msg: Any, *, msg_id: str | None = None) -> int:
        """Publish to JetStream and wait for the store's ack; returns the stream sequence."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        ack = await self.js.publish(subject, encode(msg), headers=headers)
        return ack.seq

    async def delete_queued(self, seq: int) -> None:
        """Take a job's message (by its stream sequence) out of stream JOBS."""
        await self.js.delete_msg(s.STREAM_JOBS, seq)

    async def count_job_end(self, record: JobRecord, outcome: JobOutcome | None = None) -> None:
        """Count a job that just ended (its status decides the outcome) or was retried, on
        stream JOBENDS for /health. Not waited for (a lost count only makes /health low);
        `Nats-Msg-Id` keeps a repeated write of the same end from counting twice."""
        outcome = outcome or outcome_of(record.status)
        if outcome is None:
            return
        await self.nc.publish(
            s.job_ended(record.endpoint_id, outcome),
            encode(JobEnded(job_id=record.id, endpoint_id=record.endpoint_id, outcome=outcome)),
            headers={"Nats-Msg-Id": f"{record.id}:{record.retries}:{outcome}"})
        if outcome == "failed" and is_dead(record.status):
            await self.add_dead_letter(record)

    async def add_dead_letter(self, record: JobRecord) -> None:
        """Keep a job that just became FAILED / TIMED_OUT in KV `rp-dead-letters` (per-entry
        TTL: the retention). Every writer of such a record comes through here (via
        count_job_end), so this is the one place dead letters are made. A failed write is
        logged, never raised: the job's own end is written already."""
        try:
            letter = dead_letter_of(record, now_ms=int(time.time() * 1000))
            await self.dead_letters.put(s.dead_letter_key(record.endpoint_id, record.id), letter,
                                        ttl_s=self.settings.dead_letter_retention_s)
        except Exception as exc:
            DEAD_LETTERS_LOST.inc()
            log.warning("dead letter not written", job_id=record.id, endpoint_id=record.endpoint_id,
                        error=repr(exc))

    async def request(self, subject: str, msg: Any, reply: Codec[T], timeout_s: float = 5.0) -> T:
        resp = await self.nc.request(subject, encode(msg), timeout=timeout_s)
        return reply.decode(resp.data)

    async def subscribe(
        self, subject: str, codec: Codec[T], handler: Callable[[T, Msg], Awaitable[None]],
        *, queue: str = "",
    ) -> Subscription:
        """Subscribe with decode-at-the-edge: bad payloads are logged, counted and dropped,
        and an exception in `handler` is logged without killing the subscription."""

        async def on_msg(msg: Msg) -> None:
            try:
                value = codec.decode(msg.data)
            except DecodeError as exc:
                DROPPED.labels(subject=subject).inc()
                log.warning("dropped undecodable message", subject=msg.subject, error=str(exc))
                if msg.reply:
                    await _reply_error(msg, f"undecodable message: {exc}")
                return
            try:
                await handler(value, msg)
            except Exception:
                log.exception("handler failed", subject=msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg, pending_msgs_limit=65536)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a background task owned by the bus (cancelled on close)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _reply_error(msg: Msg, error: str) -> None:
    from runplane_proto.nodes import CommandReply

    try:
        await msg.respond(encode(CommandReply(ok=False, error=error)))
    except Exception:
        pass


async def _connect_with_retry(options: dict[str, Any]) -> Client:
    delay = 0.1
    for attempt in range(100):
        try:
            return await nats.connect(**options)
        except Exception as exc:
            if attempt == 99:
                raise
            log.info("waiting for nats", servers=options["servers"], error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise RuntimeError("unreachable")
