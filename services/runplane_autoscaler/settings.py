"""Autoscaler settings, read once from RP_* environment variables into a frozen struct."""

from __future__ import annotations

import msgspec

from runplane_service.env import SettingsError, env_float, env_int, env_str


class AutoscalerSettings(msgspec.Struct, frozen=True, kw_only=True):
    interval_s: float = 0.5
    # The shared job consumer is created with this ack wait when the autoscaler sees it first.
    ack_wait_s: float = 30.0
    # Workers on a node whose heartbeat is older than this are not counted.
    node_loss_timeout_s: float = 10.0
    # A target whose count did not change is still rewritten this often to persist the state.
    persist_state_s: float = 5.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # Predictive pre-warm: the recurring period (a day), its slots, and how far ahead.
    profile_period_s: int = 86_400
    profile_slot_s: int = 900
    profile_lead_s: int = 900


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def load_settings() -> AutoscalerSettings:
    return AutoscalerSettings(
        interval_s=_positive("RP_AUTOSCALE_INTERVAL_S", env_float("RP_AUTOSCALE_INTERVAL_S", 0.5)),
        ack_wait_s=_positive("RP_ACK_WAIT_S", env_float("RP_ACK_WAIT_S", 30.0)),
        node_loss_timeout_s=_positive("RP_NODE_LOSS_TIMEOUT_S", env_float("RP_NODE_LOSS_TIMEOUT_S", 10.0)),
        persist_state_s=_positive("RP_AUTOSCALE_PERSIST_S", env_float("RP_AUTOSCALE_PERSIST_S", 5.0)),
        metrics_host=env_str("RP_METRICS_HOST", "127.0.0.1"),
        metrics_port=env_int("RP_METRICS_PORT", 0),
        profile_period_s=int(_positive("RP_PROFILE_PERIOD_S", env_int("RP_PROFILE_PERIOD_S", 86_400))),
        profile_slot_s=int(_positive("RP_PROFILE_SLOT_S", env_int("RP_PROFILE_SLOT_S", 900))),
        profile_lead_s=max(0, env_int("RP_PROFILE_LEAD_S", 900)),
    )
