"""API keys in KV `rp-api-keys` (key = the key's id): only a hash of each secret is stored.

Written and read by the gateway alone (its replicas follow the bucket with a watch), so it
is not a channel of the bus contract; the NATS permissions keep the other services out."""

from __future__ import annotations

from typing import Literal

import msgspec

from runplane_proto.ids import EndpointId

# "admin": everything the bootstrap key may do. "endpoint": the /v2 API of its endpoints
# (all endpoints when `endpoint_ids` is empty) and reads of them under /v1/endpoints.
KeyScope = Literal["admin", "endpoint"]


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    # The secret's first characters (its non-secret part), to tell keys apart in lists.
    prefix: str
    # SHA-256 of the whole secret, hex. The secret itself is shown once, at creation.
    secret_sha256: str
    scope: KeyScope = "endpoint"
    endpoint_ids: list[EndpointId] = []
    created_at_ms: int = 0
