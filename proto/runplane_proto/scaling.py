"""Scaling: the autoscaler's decision per endpoint, in KV `rp-scale` (key = endpoint id)."""

from __future__ import annotations

import msgspec

from runplane_proto.ids import EndpointId


class ScaleTarget(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_id: EndpointId
    desired_workers: int
    reason: str = ""
    decided_at_ms: int = 0
