"""Scheduler settings, read once from RP_* environment variables into a frozen struct."""

from __future__ import annotations

import msgspec

from runplane_service.env import SettingsError, env_float, env_int, env_str


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True):
    schedule_interval_s: float = 0.5
    # A node whose heartbeat is older than this is lost: its workers are replaced elsewhere.
    node_loss_timeout_s: float = 10.0
    # A start the node accepted but never reported is forgotten (and retried) after this.
    start_timeout_s: float = 30.0
    command_timeout_s: float = 5.0
    # After a failed command the node gets no new workers for this long.
    node_backoff_s: float = 5.0
    # Worker slots per CPU for CPU endpoints (every worker on a node takes one).
    workers_per_cpu: float = 4.0
    janitor_interval_s: float = 30.0
    result_retention_s: float = 1800.0
    sync_result_retention_s: float = 60.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0


def _positive(name: str, default: float) -> float:
    value = env_float(name, default)
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def load_settings() -> SchedulerSettings:
    return SchedulerSettings(
        schedule_interval_s=_positive("RP_SCHEDULE_INTERVAL_S", 0.5),
        node_loss_timeout_s=_positive("RP_NODE_LOSS_TIMEOUT_S", 10.0),
        start_timeout_s=_positive("RP_START_TIMEOUT_S", 30.0),
        command_timeout_s=_positive("RP_COMMAND_TIMEOUT_S", 5.0),
        node_backoff_s=_positive("RP_NODE_BACKOFF_S", 5.0),
        workers_per_cpu=_positive("RP_WORKERS_PER_CPU", 4.0),
        janitor_interval_s=_positive("RP_JANITOR_INTERVAL_S", 30.0),
        result_retention_s=_positive("RP_RESULT_RETENTION_S", 1800.0),
        sync_result_retention_s=_positive("RP_SYNC_RESULT_RETENTION_S", 60.0),
        metrics_host=env_str("RP_METRICS_HOST", "127.0.0.1"),
        metrics_port=env_int("RP_METRICS_PORT", 0),
    )
