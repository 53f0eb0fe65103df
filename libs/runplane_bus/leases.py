"""Leader election with a lease in KV `rp-leases`: renewed by compare-and-set each round
(and, with `keep`, between rounds, so a slow round cannot cost it), taken over by a standby
once it has expired, released on a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket

import structlog

from runplane_bus.records import Conflict, TypedKV
from runplane_proto import subjects
from runplane_proto.leases import Lease
from runplane_service.clock import Clock

log = structlog.get_logger("runplane.lease")


class LeaseKeeper:
    def __init__(self, kv: TypedKV[Lease], role: str, holder: str, ttl_s: float, clock: Clock) -> None:
        self.kv = kv
        self.key = subjects.lease_key(role)
        self.role = role
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self.clock = clock
        self.leading = False
        self._revision: int | None = None
        self._acquired_at_ms = 0
        self._renewed_at_ms = 0
        self._lock = asyncio.Lock()

    async def hold(self) -> bool:
        """Renew or take the lease if possible; True while this process leads. Call it more
        often than the TTL. On any doubt (a lost race, NATS trouble) it answers False.
        Callers take turns: one compare-and-set at a time, or this process races itself."""
        async with self._lock:
            return await self._hold()

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew (or try to take) the lease every TTL/6 until `stop`, beside a loop that calls
        `hold()` each round: a round that waits on a slow request (a JetStream request times
        out after 5 s while a stream elects a leader) then no longer lets the lease lapse, and
        a round seldom waits for the renewal's round trips."""
        while not stop.is_set():
            await self.hold()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.ttl_ms / 6000)

    async def _hold(self) -> bool:
        was_leading = self.leading
        if was_leading and self.clock.now_ms() - self._renewed_at_ms < self.ttl_ms // 3:
            # Renewed moments ago: still ours for at least 2/3 of the TTL, no round trip needed.
            return True
        try:
            self.leading = await self._try()
        except Conflict:
            self.leading = False
        except Exception as exc:
            log.warning("lease check failed", role=self.role, error=repr(exc))
            self.leading = False
        if self.leading != was_leading:
            log.info("leading" if self.leading else "standing by", role=self.role, holder=self.holder)
        return self.leading

    async def _try(self) -> bool:
        now_ms = self.clock.now_ms()
        current = await self.kv.get(self.key)
        ours = current is not None and current.value.holder == self.holder
        if current is not None and not ours and current.value.expires_at_ms > now_ms:
            return False  # someone else holds a live lease
        if not ours:
            self._acquired_at_ms = now_ms
        lease = Lease(holder=self.holder, expires_at_ms=now_ms + self.ttl_ms,
                      acquired_at_ms=self._acquired_at_ms)
        if current is None:
            garbage = await self.kv.undecodable_revision(self.key)
            if garbage is None:
                self._revision = await self.kv.create(self.key, lease)
            else:  # an unreadable lease would otherwise keep every holder out for good
                self._revision = await self.kv.update(self.key, lease, garbage)
        else:
            self._revision = await self.kv.update(self.key, lease, current.revision)
        self._renewed_at_ms = now_ms
        return True

    async def release(self) -> None:
        """Give the lease up (a clean stop), so a standby need not wait for it to expire."""
        async with self._lock:
            if not self.leading or self._revision is None:
                return
            try:
                await self.kv.kv.delete(self.key, last=self._revision)
            except Exception as exc:
                log.info("lease not released", role=self.role, error=repr(exc))
            self.leading = False


def holder_id(role: str) -> str:
    """A name for this process as a lease holder: role, host, pid, and a random part."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def open_lease(bus, role: str, clock: Clock | None = None) -> LeaseKeeper:
    """The lease for `role` with the TTL from RP_LEASE_TTL_S (5 s)."""
    from runplane_service.env import env_float

    return LeaseKeeper(bus.leases, role, holder_id(role), env_float("RP_LEASE_TTL_S", 5.0), clock or Clock())
