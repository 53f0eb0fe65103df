"""Large inputs and outputs, kept in the Object Store `rp-payloads`."""

from __future__ import annotations

from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from runplane_proto import subjects as s
from runplane_proto.jobs import INLINE_PAYLOAD_LIMIT_BYTES


class Payloads:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def save(self, job_id: str, kind: str, data: bytes) -> tuple[bytes | None, str | None]:
        """Return (inline bytes, None) for small payloads, else (None, object name) after storing it."""
        if len(data) <= INLINE_PAYLOAD_LIMIT_BYTES:
            return data, None
        name = s.payload_object(job_id, kind)
        await self.store.put(name, data)
        return None, name

    async def load(self, inline: bytes | None, ref: str | None) -> bytes | None:
        if inline is not None:
            return inline
        if ref is None:
            return None
        try:
            result = await self.store.get(ref)
        except (ObjectNotFoundError, NotFoundError):
            return None
        return result.data

    async def delete(self, ref: str | None) -> None:
        if ref is None:
            return
        try:
            await self.store.delete(ref)
        except (ObjectNotFoundError, NotFoundError):
            pass
