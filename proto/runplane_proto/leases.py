"""Leader leases in KV `rp-leases` (key = role): one active scheduler and autoscaler."""

from __future__ import annotations

import msgspec


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    holder: str
    expires_at_ms: int
    acquired_at_ms: int = 0
