"""Typed KV access: msgpack Structs in, Structs out, revisions for compare-and-set."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
import json
from typing import Any, Generic, TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Counter

from runplane_proto.codec import Codec, DecodeError, encode

T = TypeVar("T")
log = structlog.get_logger("runplane.bus.kv")

UNDECODABLE = Counter("rp_bus_undecodable_values_total",
                      "KV values that failed to decode and were treated as absent", ["bucket"])


def undecodable(bucket: str, key: str, error: Exception) -> None:
    """Log and count a KV value that does not decode (garbage put by something else)."""
    UNDECODABLE.labels(bucket=bucket).inc()
    log.warning("undecodable KV value ignored", bucket=bucket, key=key, error=str(error)[:200])


class Conflict(Exception):
    """A compare-and-set write lost to a concurrent writer."""


@dataclass(frozen=True)
class Versioned(Generic[T]):
    value: T
    revision: int


class TypedKV(Generic[T]):
    def __init__(self, kv: KeyValue, type_: type[T]) -> None:
        self.kv = kv
        self.codec: Codec[T] = Codec(type_)

    async def get(self, key: str) -> Versioned[T] | None:
        """The value and its revision; None when absent or when the value does not decode
        (logged and counted: garbage is dropped at the edge, never raised deep in a service)."""
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None
        try:
            return Versioned(self.codec.decode(entry.value), entry.revision)
        except DecodeError as exc:
            undecodable(self.kv._name, key, exc)
            return None

    async def undecodable_revision(self, key: str) -> int | None:
        """The revision of `key` if its value is garbage (so a writer can replace it by
        compare-and-set), else None."""
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None
        try:
            self.codec.decode(entry.value)
        except DecodeError:
            return entry.revision
        return None

    async def put(self, key: str, value: T, *, ttl_s: float | None = None) -> int:
        """Write unconditionally; with `ttl_s` the entry expires on its own (a per-message TTL:
        NATS >= 2.11, a bucket made with message TTLs allowed, as nats-py makes them)."""
        if ttl_s is None:
            return await self.kv.put(key, encode(value))
        ack = await self.kv._js.publish(f"{self.kv._pre}{key}", encode(value), msg_ttl=_ttl(ttl_s))
        return ack.seq

    async def create(self, key: str, value: T, *, ttl_s: float | None = None) -> int:
        """Write only if the key does not exist; raise Conflict otherwise."""
        try:
            return await self.kv.create(key, encode(value),
                                        msg_ttl=None if ttl_s is None else _ttl(ttl_s))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(key) from exc

    async def update(self, key: str, value: T, revision: int, *, ttl_s: float | None = None) -> int:
        """Write only if the key is still at `revision`; raise Conflict otherwise. An entry
        written with a TTL must be updated with one too, or the new value never expires."""
        try:
            if ttl_s is None:
                return await self.kv.update(key, encode(value), last=revision)
            return await self.kv._update(key, encode(value), last=revision, msg_ttl=_ttl(ttl_s))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(key) from exc

    async def modify(
        self, key: str, change: Callable[[T], T | None], *, attempts: int = 20,
    ) -> Versioned[T] | None:
        """Read-modify-write with retries. `change` returns the new value or None to leave it.

        Returns the value written (or the current value if `change` declined), None if absent.
        """
        for _ in range(attempts):
            current = await self.get(key)
            if current is None:
                return None
            new = change(current.value)
            if new is None:
                return current
            try:
                rev = await self.update(key, new, current.revision)
            except Conflict:
                continue
            return Versioned(new, rev)
        raise Conflict(key)

    async def delete(self, key: str) -> None:
        try:
            await self.kv.purge(key)
        except (KeyNotFoundError, KeyDeletedError):
            pass

    async def keys(self, pattern: str = ">") -> list[str]:
        """Current keys matching a NATS subject pattern (e.g. `ep.*`)."""
        return [entry.key for entry in await self._scan(pattern, meta_only=True)]

    async def items(self, pattern: str = ">") -> AsyncIterator[tuple[str, T]]:
        """Every current value whose key matches `pattern`; undecodable ones are skipped."""
        for entry in await self._scan(pattern, meta_only=False):
            try:
                value = self.codec.decode(entry.value)
            except DecodeError as exc:
                undecodable(self.kv._name, entry.key, exc)
                continue
            yield entry.key, value

    async def pages(self, pattern: str = ">", *, page_size: int = 1000) -> AsyncIterator[list[tuple[str, T]]]:
        """Every current value whose key matches `pattern`, `page_size` at a time, oldest
        write first: one pull consumer (last value per key) fetched page by page, so memory
        stays at one page however large the bucket. A key written during the read may come
        twice or be missed at its new value (the caller's rules run again next time); keys
        written after the read began are left for the next read, so it ends however busy the
        bucket is."""
        js = self.kv._js
        stream = f"KV_{self.kv._name}"
        prefix = f"$KV.{self.kv._name}."
        consumer = await js.add_consumer(stream, ConsumerConfig(
            filter_subject=prefix + pattern, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True, num_replicas=1))
        reader = _PageReader(js._nc, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer.name}")
        await reader.start()
        try:
            left = consumer.num_pending or 0
            while left > 0:
                msgs = await reader.next_page(min(page_size, left))
                page: list[tuple[str, T]] = []
                for msg in msgs:
                    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                        continue
                    key = msg.subject[len(prefix):]
                    try:
                        page.append((key, self.codec.decode(msg.data)))
                    except DecodeError as exc:
                        undecodable(self.kv._name, key, exc)
                left -= len(msgs)
                if page:
                    yield page
                if not msgs:
                    return
        finally:
            try:
                await reader.stop()
                await js.delete_consumer(stream, consumer.name)
            except Exception:  # it goes by itself after `inactive_threshold`
                pass

    async def _scan(self, pattern: str, *, meta_only: bool) -> list[Any]:
        """The latest entry of every live key matching `pattern`, each key once.

        A plain watch read until its "initial values done" marker (or an entry with no
        pending messages) misses keys now and then: nats-py may send the marker before it
        has handed over messages the server already delivered, and a key written during
        the read is skipped at its old revision with its new one not yet counted. So every
        message is counted here (deletes too), the read ends only when the consumer
        confirms that nothing is pending and everything it delivered was received, and a
        key seen twice keeps its newest entry.
        """
        watcher = await self.kv.watch(pattern, meta_only=meta_only)
        latest: dict[str, Any] = {}
        received = 0
        try:
            while True:
                quiet = False
                try:
                    entry = await watcher.updates(timeout=_SCAN_POLL_S)
                except NatsTimeoutError:
                    entry, quiet = None, True
                if entry is not None:
                    received += 1
                    seen = latest.get(entry.key)
                    if seen is None or entry.revision > seen.revision:
                        latest[entry.key] = entry
                    if entry.delta != 0:
                        continue
                if await _caught_up(watcher, received, quiet=quiet):
                    break
        finally:
            await watcher.stop()
        return [e for e in latest.values()
                if e.operation not in ("DEL", "PURGE") and (meta_only or e.value is not None)]


_SCAN_POLL_S = 1.0
# How long a page fetch waits when the consumer has nothing (an empty bucket or pattern).
_PAGE_WAIT_S = 0.5


class _PageReader:
    """Pages of a pull consumer, read off one inbox subscription with a callback: nats-py's
    own fetch waits for each message with a task and a timer of its own: a janitor pass over
    20,000 records took ~48 us of CPU a record with it and ~21 with this (decoding included)."""

    def __init__(self, nc: Client, next_subject: str) -> None:
        self.nc = nc
        self.next_subject = next_subject
        self.inbox = nc.new_inbox()
        self.sub: Subscription | None = None
        self.msgs: list[Msg] = []
        self.want = 0
        self.done: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.inbox, cb=self._on_msg, pending_msgs_limit=-1,
                                           pending_bytes_limit=-1)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        if self.done is None or self.done.done():
            return  # a status (or a straggler) for a page already handed over
        if not msg.data and msg.headers and "Status" in msg.headers:
            if msg.headers["Status"] != "100":  # 404 / 408: nothing more for this request
                self.done.set_result(None)
            return
        self.msgs.append(msg)
        if len(self.msgs) >= self.want:
            self.done.set_result(None)

    async def next_page(self, want: int) -> list[Msg]:
        """Up to `want` messages there now (fewer when the consumer runs out)."""
        self.msgs, self.want = [], want
        self.done = asyncio.get_running_loop().create_future()
        await self.nc.publish(self.next_subject, json.dumps({"batch": want, "no_wait": True}).encode(),
                              reply=self.inbox)
        try:
            await asyncio.wait_for(asyncio.shield(self.done), timeout=_PAGE_WAIT_S + want / 1000)
        except asyncio.TimeoutError:
            pass  # no answer in time: what came is the page (an empty one ends the read)
        msgs, self.msgs, self.done = self.msgs, [], None
        return msgs


def _ttl(ttl_s: float) -> int:
    """A per-message TTL in whole seconds (the header's unit), at least 1."""
    return max(1, int(ttl_s))


async def _caught_up(watcher: Any, received: int, *, quiet: bool) -> bool:
    info = await watcher._sub.consumer_info()
    if info.num_pending:
        return False
    delivered = info.delivered.consumer_seq if info.delivered else 0
    # After a poll with nothing new, what is still missing was dropped by the client
    # (nats-py skips server markers it does not know): do not wait for it forever.
    return delivered <= received or quiet
