"""Scaling: the autoscaler's decision per endpoint, in KV `rp-scale` (key = endpoint id)."""

from __future__ import annotations

import msgspec

from runplane_proto.ids import EndpointId


class ScaleTarget(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_id: EndpointId
    desired_workers: int
    reason: str = ""
    decided_at_ms: int = 0
    # The autoscaler's policy state, persisted beside the decision so a restarted
    # (or standby) autoscaler continues with the same idle windows. 0 = never.
    # Last sample with queued or in-progress work.
    last_active_at_ms: int = 0
    # Last sample whose demand needed all of `desired_workers` (no surplus).
    last_needed_at_ms: int = 0
    # When `desired_workers` last went up.
    last_scale_up_at_ms: int = 0
    # Flash endpoints: workers to keep pre-warmed (live or parked together) at any count.
    prewarm_workers: int = 0
    # The endpoint's daily load as learned so far: per slot of the day (RP_PROFILE_SLOT_S),
    # a decaying average of the most workers wanted in that slot; the slot being observed
    # now (-1: none yet) and the most workers wanted in it so far.
    load_profile: list[float] = []
    profile_slot: int = -1
    slot_peak: int = 0
    # Why the count is held below what the load asks for (no capacity), "" when it is not.
    throttled: str = ""


class PlacementStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Workers an endpoint wants that no node can take now, and why; KV `rp-placement`
    (key = endpoint id), written by the scheduler, deleted once they are placed."""

    endpoint_id: EndpointId
    pending_workers: int
    reason: str
    # When the endpoint's workers first stayed pending (this episode), and the last write.
    since_ms: int = 0
    updated_at_ms: int = 0
