"""Endpoints: the spec stored in KV `rp-endpoints`, key = endpoint id."""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

from runplane_proto.ids import EndpointId

ScalerType = Literal["QUEUE_DELAY", "REQUEST_COUNT"]


class WarmWindow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A recurring time during which a flash endpoint keeps `workers` pre-warmed: it opens
    at each time the five-field cron expression names, in `timezone`, for `minutes`."""

    cron: str
    minutes: int
    workers: int = 1
    timezone: str = "UTC"


class EndpointSpec(msgspec.Struct, frozen=True, kw_only=True):
    id: EndpointId
    name: str
    image_name: str | None = None
    # argv the process runtime runs (and the CMD override for images).
    command: list[str] = []
    env: dict[str, str] = {}
    workers_min: int = 0
    workers_max: int = 3
    idle_timeout_s: int = 5
    scaler_type: ScalerType = "QUEUE_DELAY"
    scaler_value: int = 4
    flashboot: bool = True
    gpu_count: int = 0
    gpu_type_ids: list[str] = []
    execution_timeout_ms: int = 600_000
    # Flash endpoints: workers kept pre-warmed (started, initialised, parked) even at zero
    # active workers, so the first job after a quiet spell is a flash start, not a cold one.
    prewarm_workers: int = 0
    # More pre-warmed workers at given times (the most any open window asks for)...
    warm_windows: list[WarmWindow] = []
    # ...and ahead of the endpoint's recurring daily load, learned from its own history.
    predictive_prewarm: bool = False
    # Fair share: when GPUs (or worker slots) are contended, endpoints get them in proportion
    # to their weights; `gpu_quota` caps the GPUs the endpoint's workers hold (0 = no cap).
    weight: int = 1
    gpu_quota: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0


def launch_key(spec: EndpointSpec) -> str:
    """What a worker of `spec` is: its image, command, env and GPUs. Workers started with
    another key are of another version of the endpoint (scaling fields do not count)."""
    made_of = msgspec.msgpack.encode([spec.image_name, spec.command, sorted(spec.env.items()),
                                      spec.gpu_count, spec.gpu_type_ids])
    return hashlib.sha256(made_of).hexdigest()[:16]
