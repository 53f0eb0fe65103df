"""Typed KV access: msgpack Structs in, Structs out, revisions for compare-and-set."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from runplane_proto.codec import Codec, DecodeError, encode

T = TypeVar("T")


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
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None
        return Versioned(self.codec.decode(entry.value), entry.revision)

    async def put(self, key: str, value: T) -> int:
        return await self.kv.put(key, encode(value))

    async def create(self, key: str, value: T) -> int:
        """Write only if the key does not exist; raise Conflict otherwise."""
        try:
            return await self.kv.create(key, encode(value))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(key) from exc

    async def update(self, key: str, value: T, revision: int) -> int:
        """Write only if the key is still at `revision`; raise Conflict otherwise."""
        try:
            return await self.kv.update(key, encode(value), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise Conflict(key) from exc

    async def modify(self, key: str, change: Callable[[T], T | None], *, attempts: int = 20) -> Versioned[T] | None:
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
        watcher = await self.kv.watch(pattern, ignore_deletes=True, meta_only=True)
        keys: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                keys.append(entry.key)
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
        return keys

    async def items(self, pattern: str = ">") -> AsyncIterator[tuple[str, T]]:
        """Every current value whose key matches `pattern`; undecodable ones are skipped."""
        watcher = await self.kv.watch(pattern, ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value is not None and entry.operation not in ("DEL", "PURGE"):
                    try:
                        yield entry.key, self.codec.decode(entry.value)
                    except DecodeError:
                        pass
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
