"""API keys: the bootstrap admin key (`RP_API_KEY`) and the keys made through `/v1/keys`.

A made key's secret is `rpk_<id>_<random>`; KV `rp-api-keys` keeps only its SHA-256 under
the id. Every replica follows the bucket with a watch (`Mirror`), so checking a key needs
no round trip, and a revoked key stops working on every replica as soon as the watch
brings the delete (milliseconds; a periodic full re-read bounds it when a watch misses it).
A well-formed key whose id a replica has never heard of is read from the bucket once before
it is refused, so a key made through one replica works at once on another, ahead of the
watch (misses are remembered for a second and such reads bounded, so made-up ids cannot
turn into a flood of reads).

What a key may reach is the pure `refusal(access, method, path)`: admin keys everything;
endpoint keys the /v2 API of their endpoints and reads of them under /v1/endpoints."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from starlette.requests import Request

from runplane_bus import Bus
from runplane_bus.mirror import Mirror
from runplane_bus.records import TypedKV
from runplane_proto import subjects
from runplane_proto.keys import ApiKey

log = structlog.get_logger("runplane.gateway.keys")

SECRET_PREFIX = "rpk_"
# How often each replica re-reads the whole bucket besides following its watch: the bound
# on how long a revoked key can outlive a watch that missed the delete.
RESYNC_S = 10.0
# How long a write waits for this replica's own copy to show it (read-your-writes).
_SETTLE_S = 2.0
# A well-formed id read from the bucket and not found there is refused without another read
# for this long; at most this many such ids are remembered, and this many reads run at once.
_MISS_HOLD_S = 1.0
_MISSES_KEPT = 4096
_READS_AT_ONCE = 16
# Where the middleware leaves the caller's Access for the routes (`request.state.access`).
STATE_KEY = "access"


@dataclass(frozen=True)
class Access:
    """Who is calling: the bootstrap key, or a made key and its scope."""

    key_id: str | None  # None: the bootstrap key RP_API_KEY
    admin: bool
    endpoint_ids: frozenset[str] = frozenset()  # empty: every endpoint

    def may_use(self, endpoint_id: str) -> bool:
        return self.admin or not self.endpoint_ids or endpoint_id in self.endpoint_ids


BOOTSTRAP = Access(key_id=None, admin=True)


def access_of(record: ApiKey) -> Access:
    return Access(key_id=record.id, admin=record.scope == "admin",
                  endpoint_ids=frozenset(record.endpoint_ids))


def new_key_id() -> str:
    return secrets.token_hex(8)


def new_secret(key_id: str) -> str:
    """`rpk_<id>_<43 random URL-safe characters>` (256 bits)."""
    return f"{SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def secret_prefix(key_id: str) -> str:
    """The non-secret head of a key's secret, shown in lists."""
    return f"{SECRET_PREFIX}{key_id}"


def secret_hash(secret: bytes) -> str:
    """SHA-256, hex: enough for 256-bit random secrets (no dictionary to try them against)."""
    return hashlib.sha256(secret).hexdigest()


def key_id_in(secret: bytes) -> str | None:
    """The id a presented secret claims (`rpk_<id>_...`), or None if it is not shaped so."""
    if not secret.startswith(SECRET_PREFIX.encode()):
        return None
    key_id, sep, rest = secret[len(SECRET_PREFIX):].partition(b"_")
    if not sep or not rest or not 1 <= len(key_id) <= 64 or not key_id.isalnum():
        return None
    return key_id.decode()


def refusal(access: Access, method: str, path: str) -> str | None:
    """Why `access` may not make this request (403), or None when it may."""
    if access.admin:
        return None
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "v2":
        return None if access.may_use(parts[2]) else _other_endpoint(parts[2])
    reading = method in ("GET", "HEAD")
    if parts[1:3] == ["v1", "endpoints"]:
        if len(parts) == 3 or parts[3:] == [""]:
            return None if reading else "this API key may not create endpoints: that takes an admin key"
        if not access.may_use(parts[3]):
            return _other_endpoint(parts[3])
        if parts[4:5] == ["dead-letters"]:
            # Its endpoint's dead letters: list, replay (the target endpoint is checked by the
            # route) and delete, as its /v2 API may queue and cancel that endpoint's jobs.
            return None
        return None if reading else "this API key may not change or delete endpoints: that takes an admin key"
    if parts[1:3] == ["v1", "keys"]:
        return "this API key may not manage API keys: that takes an admin key"
    return f"this API key may not use {path[:100]}: that takes an admin key"


def _verified(presented: bytes, key_id: str | None, record: ApiKey | None) -> Access | None:
    """The Access `record` gives when `presented` is its secret, else None."""
    if record is None or record.id != key_id:  # a value under another key stands for nothing
        return None
    if not hmac.compare_digest(secret_hash(presented).encode(), record.secret_sha256.encode()):
        return None
    return access_of(record)


def _other_endpoint(endpoint_id: str) -> str:
    return f"this API key may not use endpoint {endpoint_id[:128]!r}"


def access_in(request: Request) -> Access:
    """The caller's Access, as the auth middleware left it."""
    access = getattr(request.state, STATE_KEY, None)
    if not isinstance(access, Access):  # a route reached without the middleware: refuse
        raise RuntimeError("no API key access on a protected route")
    return access


class KeyRing:
    """Every made key (from KV, followed live) plus the bootstrap key."""

    def __init__(self, bus: Bus, bootstrap_key: str, *, resync_s: float = RESYNC_S) -> None:
        self.bootstrap = bootstrap_key.encode()
        self.store: TypedKV[ApiKey] | None = None
        self.bus = bus
        self.resync_s = resync_s
        self.mirror: Mirror[ApiKey] | None = None
        self._misses: dict[str, float] = {}  # key id -> when a read found nothing (monotonic)
        self._reads = 0

    async def start(self) -> KeyRing:
        self.store = TypedKV(await self.bus.kv(subjects.KV_API_KEYS), ApiKey)
        self.mirror = await Mirror(self.store, resync_s=self.resync_s).start()
        return self

    async def stop(self) -> None:
        if self.mirror is not None:
            await self.mirror.stop()

    def check(self, presented: bytes) -> Access | None:
        """The Access of a presented secret, or None for an unknown, revoked or wrong one."""
        if hmac.compare_digest(presented, self.bootstrap):
            return BOOTSTRAP
        key_id = key_id_in(presented)
        record = self.mirror.get(key_id) if key_id is not None and self.mirror is not None else None
        return _verified(presented, key_id, record)

    async def check_unheard(self, presented: bytes) -> Access | None:
        """For a secret `check` refused: when it names a key id this replica has never heard
        of (not even deleted), the Access one read of the bucket gives it, else None."""
        key_id = key_id_in(presented)
        if key_id is None or self.store is None or self.mirror is None or self.mirror.heard_of(key_id):
            return None
        now = time.monotonic()
        missed = self._misses.get(key_id)
        if (missed is not None and now - missed < _MISS_HOLD_S) or self._reads >= _READS_AT_ONCE:
            return None
        self._reads += 1
        try:
            found = await self.store.get(subjects.api_key_key(key_id))
        except Exception as exc:  # the bus is down or slow: refused like any unknown key
            log.warning("API key read failed", key_id=key_id, error=repr(exc))
            return None
        finally:
            self._reads -= 1
        if found is None:
            if len(self._misses) >= _MISSES_KEPT:
                self._misses.clear()
            self._misses[key_id] = now
            return None
        return _verified(presented, key_id, found.value)

    def records(self) -> list[ApiKey]:
        assert self.mirror is not None
        found = [record for key, record in self.mirror.items() if record.id == key]
        found.sort(key=lambda r: (r.created_at_ms, r.id))
        return found

    def get(self, key_id: str) -> ApiKey | None:
        assert self.mirror is not None
        record = self.mirror.get(key_id)
        return record if record is not None and record.id == key_id else None

    async def add(self, record: ApiKey) -> None:
        assert self.store is not None
        await self.store.create(subjects.api_key_key(record.id), record)
        await self._settled(lambda: self.get(record.id) is not None)
        log.info("API key created", key_id=record.id, scope=record.scope, endpoints=len(record.endpoint_ids))

    async def revoke(self, key_id: str) -> None:
        assert self.store is not None
        await self.store.delete(subjects.api_key_key(key_id))
        await self._settled(lambda: self.get(key_id) is None)
        log.info("API key revoked", key_id=key_id)

    async def _settled(self, done: Callable[[], bool]) -> None:
        """Wait (briefly) until this replica's copy shows a write it made."""
        deadline = time.monotonic() + _SETTLE_S
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
