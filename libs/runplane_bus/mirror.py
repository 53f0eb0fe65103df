"""A live in-memory copy of a KV bucket, kept current by a watch.

Services that look at a whole bucket every round (the scheduler reads every node's
status, every endpoint and every scale target) keep a mirror instead of re-reading the
bucket: a round then costs nothing on the bus and sees changes within milliseconds.

Correctness does not rest on the watch alone: entries are applied only when their
revision is newer than what the mirror holds (deletes leave a tombstone revision), and
the mirror re-reads the whole bucket every `resync_s` and merges it the same way, so a
watch that missed something (a reconnect, a server restart) heals within one period.

The watch is an ordered push consumer (what nats-py's `kv.watch` makes) with a short idle
heartbeat: it has one replica, on one server, and the client notices that it is gone only
after two missed heartbeats. With kv.watch's 5 s heartbeat (checked every 10 s) a mirror whose
consumer was on a lost server went stale for 10-20 s; with 1 s it is recreated after 2-4 s,
from the revision after the last one received.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import structlog
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from runplane_bus.records import TypedKV, undecodable
from runplane_proto.codec import DecodeError

T = TypeVar("T")
log = structlog.get_logger("runplane.bus.mirror")

_DELETED = ("DEL", "PURGE")
# The watch's idle heartbeat: a consumer lost with its server is recreated after two missed.
WATCH_HEARTBEAT_S = 1.0
# A consumer nobody listens to any more (its client gone, or left behind by a recreation that
# raced another) is dropped by the server after this long.
WATCH_INACTIVE_S = 30.0
# Server-placed markers (a TTL or an age limit) say what happened in this header instead.
_MARKER_OPERATIONS = {"MaxAge": "PURGE", "Purge": "PURGE", "Remove": "DEL"}


class Mirror(Generic[T]):
    """`await Mirror(typed_kv).start()`, then `mirror.values()`; `on_change(key, old, new)`
    is called (synchronously) for every applied change, None standing for "absent", e.g. to
    wake a control loop when something it cares about changed.

    `refresh(held, data)` may spare decoding a value in full: given the value held for the
    key and the new bytes, it returns the value to hold instead (say, the held one with a
    new heartbeat time, when the bytes say nothing else the reader uses has changed), or
    None to decode them as usual."""

    def __init__(self, store: TypedKV[T], *, resync_s: float = 30.0,
                 on_change: Callable[[str, T | None, T | None], None] | None = None,
                 refresh: Callable[[T, bytes], T | None] | None = None) -> None:
        self.store = store
        self.resync_s = resync_s
        self.on_change = on_change
        self.refresh = refresh
        self._values: dict[str, T] = {}
        self._revisions: dict[str, int] = {}  # includes tombstones of deleted keys
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher: Any = None
        self._prefix = ""
        self.applied = 0  # changes applied (tests and metrics read it)

    async def start(self) -> Mirror[T]:
        """Watch first, then read everything once: nothing written in between is missed."""
        kv = self.store.kv
        self._prefix = kv._pre
        self._watcher = await kv._js.subscribe(
            self._prefix + ">", stream=kv._stream, cb=self._on_message, ordered_consumer=True,
            idle_heartbeat=WATCH_HEARTBEAT_S, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=WATCH_INACTIVE_S)
        await self.resync()
        self._tasks.append(asyncio.create_task(self._resync_forever()))
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.unsubscribe()
            self._watcher = None

    def get(self, key: str) -> T | None:
        return self._values.get(key)

    def values(self) -> list[T]:
        return list(self._values.values())

    def heard_of(self, key: str) -> bool:
        """Whether this mirror has seen `key` at all: held now, or deleted (a tombstone)."""
        return key in self._revisions

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._values.items()))

    def __len__(self) -> int:
        return len(self._values)

    async def resync(self) -> None:
        """Merge a full read of the bucket (deleted keys absent from it are dropped)."""
        kv = self.store.kv
        horizon = (await kv._js.stream_info(kv._stream)).state.last_seq
        entries = await self.store._scan(">", meta_only=False)
        seen = set()
        for entry in entries:
            seen.add(entry.key)
            self._apply(entry.key, entry.revision, entry.operation, entry.value)
        # A key written before the read began and absent from it was deleted meanwhile.
        for key in [k for k in self._values if k not in seen]:
            if self._revisions.get(key, 0) <= horizon:
                self._apply(key, horizon, "DEL", None, force=True)

    def _apply(self, key: str, revision: int, operation: str | None, data: bytes | None, *,
               force: bool = False) -> None:
        if not force and revision <= self._revisions.get(key, 0):
            return
        self._revisions[key] = revision
        old = self._values.get(key)
        new: T | None = None
        if operation in _DELETED or data is None:
            if self._values.pop(key, None) is None and not force:
                return
        else:
            new = self.refresh(old, data) if self.refresh is not None and old is not None else None
            try:
                if new is None:
                    new = self.store.codec.decode(data)
            except DecodeError as exc:  # garbage: keep the last good value, if any
                undecodable(self.store.kv._name, key, exc)
                return
            self._values[key] = new
        self.applied += 1
        if self.on_change is not None:
            self.on_change(key, old, new)

    async def _on_message(self, msg: Msg) -> None:
        """One entry from the watch, parsed as kv.watch does (key, revision, operation)."""
        try:
            headers = msg.headers or {}
            operation = headers.get("KV-Operation")
            if operation is None and "Nats-Marker-Reason" in headers:
                operation = _MARKER_OPERATIONS.get(headers["Nats-Marker-Reason"])
                if operation is None:  # a marker of a kind this version does not know
                    return
            self._apply(msg.subject[len(self._prefix):], msg.metadata.sequence.stream, operation, msg.data)
        except Exception as exc:  # keep following; the periodic resync heals gaps
            log.warning("watch entry not applied", subject=msg.subject, error=repr(exc))

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            try:
                await self.resync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("resync failed", error=repr(exc))
