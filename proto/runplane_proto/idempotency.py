"""Idempotent submits: which job an `Idempotency-Key` already made.

Value of KV `rp-idempotency`, key `<endpoint>.<digest>` where the digest is the SHA-256 of the
caller's API key id and the client's key (so keys are scoped per endpoint and per API key, and
any printable key fits a KV key). Written with KV `create` (the NATS server decides a race
between gateway replicas) and a per-entry TTL: the idempotency window.
"""

from __future__ import annotations

import msgspec

from runplane_proto.ids import EndpointId, JobId


class IdempotentSubmit(msgspec.Struct, frozen=True, kw_only=True):
    job_id: JobId
    endpoint_id: EndpointId
    created_at_ms: int
    # SHA-256 (hex) of the submit body without `idempotencyKey`: a repeat with another body is
    # refused (422) instead of silently answered with a job for different input.
    body_sha256: str
    sync: bool = False
