"""Idempotent submits: an `Idempotency-Key` header (or `idempotencyKey` body field) on /run and
/runsync makes a repeat within the window answer the original job instead of queuing another.

The key's entry in KV `rp-idempotency` is written with `create` before the job is queued, so
when two replicas race on one key the NATS server lets exactly one create win; the loser
answers with the winner's job. Keys are scoped per endpoint and per API key (the entry's name
is a SHA-256 of the caller's key id and the client's key). A repeat with another body is
refused with 422 naming the mismatch: the same key must mean the same request."""

from __future__ import annotations

import hashlib
import unicodedata
from typing import NamedTuple

import msgspec
import structlog
from msgspec import Raw

from runplane_bus import Bus, Conflict, TypedKV
from runplane_proto import subjects
from runplane_proto.idempotency import IdempotentSubmit
from runplane_service.clock import Clock
from runplane_gateway.errors import ApiError

log = structlog.get_logger("runplane.gateway.idempotency")

HEADER = "idempotency-key"
BODY_FIELD = "idempotencyKey"
MAX_KEY_CHARS = 255
_key_decoder = msgspec.json.Decoder(str)
_any_decoder = msgspec.json.Decoder()
_canonical = msgspec.json.Encoder(order="sorted")


class Claim(NamedTuple):
    entry: IdempotentSubmit
    ours: bool  # True: this submit made the entry and must queue the job
    name: str  # the entry's key in KV


def client_key(header: str | None, field: Raw | None) -> str | None:
    """The client's idempotency key from the header or the body field (400 when bad, or when
    both are given and differ); None when neither is."""
    from_body = None
    if field is not None and bytes(field) != b"null":
        try:
            from_body = _key_decoder.decode(field)
        except msgspec.ValidationError:
            raise ApiError(400, f"{BODY_FIELD} must be a string") from None
    if header is not None and from_body is not None and header != from_body:
        raise ApiError(400, f"the {HEADER} header and the {BODY_FIELD} field differ: send one key")
    key = header if header is not None else from_body
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise ApiError(400, f"an idempotency key must be 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in key):
        raise ApiError(400, "an idempotency key must not contain control characters")
    return key


def body_digest(body: bytes) -> str:
    """SHA-256 of the body as JSON with sorted keys and without the key field, so whitespace and
    key order do not make a repeat look like another request."""
    fields = _any_decoder.decode(body)
    if isinstance(fields, dict):
        fields.pop(BODY_FIELD, None)
    return hashlib.sha256(_canonical.encode(fields)).hexdigest()


def entry_name(endpoint_id: str, scope: str, key: str) -> str:
    digest = hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()
    return subjects.idempotency_key(endpoint_id, digest)


class Idempotency:
    def __init__(self, bus: Bus, window_s: float, clock: Clock) -> None:
        self.bus = bus
        self.window_s = window_s
        self.clock = clock
        self.store: TypedKV[IdempotentSubmit] | None = None

    async def start(self) -> Idempotency:
        self.store = TypedKV(await self.bus.kv(subjects.KV_IDEMPOTENCY), IdempotentSubmit)
        return self

    async def claim(self, endpoint_id: str, scope: str, key: str, *, digest: str, job_id: str,
                    sync: bool) -> Claim:
        """Make the key's entry for `job_id`, or find the one a first submit made."""
        assert self.store is not None
        name = entry_name(endpoint_id, scope, key)
        mine = IdempotentSubmit(job_id=job_id, endpoint_id=endpoint_id, created_at_ms=self.clock.now_ms(),
                                body_sha256=digest, sync=sync)
        for _ in range(5):
            try:
                await self.store.create(name, mine, ttl_s=self.window_s)
                return Claim(mine, True, name)
            except Conflict:
                pass
            found = await self.store.get(name)
            if found is not None:  # else: expired or released just now; create again
                if found.value.body_sha256 != digest:
                    raise ApiError(422, f"idempotency key {key[:64]!r} was used for job {found.value.job_id} "
                                        "with another body; a repeat must send the same body")
                return Claim(found.value, False, name)
        raise ApiError(409, "the idempotency key kept changing under concurrent submits; try again")

    async def release(self, claim: Claim) -> None:
        """The submit that made the entry failed: let a repeat try again."""
        assert self.store is not None
        try:
            await self.store.delete(claim.name)
        except Exception as exc:
            log.warning("idempotency entry not released", job_id=claim.entry.job_id, error=repr(exc))
