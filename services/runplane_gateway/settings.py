"""Gateway settings, read once from RP_* environment variables into a frozen struct."""

from __future__ import annotations

import ipaddress
import secrets

import msgspec

from runplane_service.env import SettingsError, env_bool, env_float, env_int, env_opt, env_str

MB = 1024 * 1024


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    api_key: str
    # True when RP_API_KEY was unset and the key was generated (main logs it).
    api_key_generated: bool = False
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    runsync_wait_ms: int = 90_000
    result_retention_s: float = 1800.0
    sync_result_retention_s: float = 60.0
    webhook_retry_delay_s: float = 10.0
    webhook_timeout_s: float = 10.0
    # Hosts (lower case) and networks the gateway refuses to call for webhooks.
    webhook_deny_hosts: frozenset[str] = frozenset()
    webhook_deny_networks: tuple[str, ...] = ()
    ack_wait_s: float = 30.0
    max_body_run_bytes: int = 10 * MB
    max_body_runsync_bytes: int = 20 * MB
    # RunPod's per-endpoint request limits (429 beyond them); RP_RATE_LIMITS=0 turns them off.
    rate_limits: bool = True
    # Node status older than this is a lost node: its workers are not counted in /health.
    node_loss_timeout_s: float = 10.0
    # Jobs an endpoint may have queued (not yet taken) before /run and /runsync answer 429
    # (RunPod: 50,000); 0 turns the cap off.
    queue_cap: int = 50_000
    # How long an Idempotency-Key stands for the job it made (the TTL of its KV entry).
    idempotency_window_s: float = 86_400.0


def parse_deny_list(raw: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """Split `RP_WEBHOOK_DENY` into host names and CIDR networks (an IP is a /32 or /128)."""
    hosts: set[str] = set()
    networks: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            hosts.add(item.lower().rstrip("."))
    return frozenset(hosts), tuple(networks)


def load_settings() -> GatewaySettings:
    key = env_opt("RP_API_KEY")
    generated = key is None
    if key is None:
        key = "rp_" + secrets.token_urlsafe(24)
    hosts, networks = parse_deny_list(env_str("RP_WEBHOOK_DENY", ""))
    wait_ms = env_int("RP_RUNSYNC_WAIT_MS", 90_000)
    if wait_ms <= 0:
        raise SettingsError(f"RP_RUNSYNC_WAIT_MS must be positive, got {wait_ms}")
    return GatewaySettings(
        api_key=key,
        api_key_generated=generated,
        http_host=env_str("RP_HTTP_HOST", "127.0.0.1"),
        http_port=env_int("RP_HTTP_PORT", 8000),
        runsync_wait_ms=wait_ms,
        result_retention_s=env_float("RP_RESULT_RETENTION_S", 1800.0),
        sync_result_retention_s=env_float("RP_SYNC_RESULT_RETENTION_S", 60.0),
        webhook_retry_delay_s=env_float("RP_WEBHOOK_RETRY_DELAY_S", 10.0),
        webhook_timeout_s=env_float("RP_WEBHOOK_TIMEOUT_S", 10.0),
        webhook_deny_hosts=hosts,
        webhook_deny_networks=networks,
        ack_wait_s=env_float("RP_ACK_WAIT_S", 30.0),
        max_body_run_bytes=env_int("RP_MAX_BODY_RUN_BYTES", 10 * MB),
        max_body_runsync_bytes=env_int("RP_MAX_BODY_RUNSYNC_BYTES", 20 * MB),
        rate_limits=env_bool("RP_RATE_LIMITS", True),
        node_loss_timeout_s=env_float("RP_NODE_LOSS_TIMEOUT_S", 10.0),
        queue_cap=_queue_cap(),
        idempotency_window_s=_idempotency_window_s(),
    )


def _idempotency_window_s() -> float:
    window_s = env_float("RP_IDEMPOTENCY_WINDOW_S", 86_400.0)
    if not 1 <= window_s <= 30 * 86_400:
        raise SettingsError(f"RP_IDEMPOTENCY_WINDOW_S must be 1 s to 30 days, got {window_s}")
    return window_s


def _queue_cap() -> int:
    cap = env_int("RP_QUEUE_CAP", 50_000)
    if cap < 0:
        raise SettingsError(f"RP_QUEUE_CAP must be 0 (no cap) or a positive number of jobs, got {cap}")
    return cap
