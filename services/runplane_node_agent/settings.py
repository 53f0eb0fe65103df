"""Node agent settings, read once from RP_* environment variables into a frozen struct."""

from __future__ import annotations

import re
import socket

import msgspec
from runplane_proto.ids import is_valid_id
from runplane_service.env import SettingsError, env_bool, env_float, env_int, env_opt, env_str

# Workers give up on a take after 90 s (runpod SDK); our long-poll must end well before.
WORKER_TAKE_TIMEOUT_S = 90.0
RUNTIMES = ("process", "docker", "auto")
ANY_HOST = ("0.0.0.0", "::", "")


class AgentSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    node_id: str
    host: str = "127.0.0.1"
    # 0 picks a free port; the worker URL templates are built after binding.
    port: int = 8100
    # Base URL workers use to reach the agent; None: http://<host>:<port>.
    url: str | None = None
    # process | docker | auto (docker when an engine answers, else process).
    runtime: str = "process"
    # Limits for each container worker (docker runtime); 0: none.
    worker_memory_mb: int = 0
    worker_cpus: float = 0.0
    # The disk whose size and free space the node reports.
    disk_path: str = "/"
    ack_wait_s: float = 30.0
    max_attempts: int = 3
    # A first delivery this soon after its submit goes to a worker on the record its queue
    # message carries, before the stored record is read (0: always read it first).
    as_sent_window_ms: int = 50
    # A first attempt's claim (IN_PROGRESS) is written this long after its hand-over; a job
    # that ends sooner is stored once, its attempt carried by the terminal write (0: at once).
    claim_delay_ms: int = 20
    heartbeat_s: float = 1.0
    worker_ping_interval_ms: int = 5000
    worker_ping_timeout_s: float = 15.0
    stop_grace_s: float = 5.0
    take_poll_s: float = 20.0
    shutdown_grace_s: float = 30.0
    # Flash boot: an idle worker of a flash endpoint is paused once its take poll has waited
    # this long without a job (negative: never; parked workers are paused at once).
    flash_pause_s: float = 1.0
    # Memory the node's pool of parked workers may hold; None: a quarter of the node's
    # memory; 0: no parking (surplus workers are stopped).
    park_memory_mb: int | None = None
    # Commit an initialised worker of a flash endpoint into a per-node snapshot image that
    # later cold starts of the endpoint on this node start from (runtimes that can).
    snapshots: bool = True
    # How often snapshot images of endpoints that no longer exist are removed.
    snapshot_gc_s: float = 300.0

    @property
    def keepalive_s(self) -> float:
        """How often a held JetStream message is told we are still working on it."""
        return self.ack_wait_s / 3

    def worker_base_url(self, bound_port: int, worker_host: str | None = None) -> str:
        """`worker_host`: where the runtime's workers reach this host (a container bridge)."""
        if self.url:
            return self.url.rstrip("/")
        host = worker_host or ("127.0.0.1" if self.host in ANY_HOST else self.host)
        return f"http://{host}:{bound_port}"


def default_node_id(hostname: str | None = None) -> str:
    """A valid id derived from the hostname (dots and other characters become dashes)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", hostname or socket.gethostname()).strip("-")[:128]
    return name or "node"


def env_opt_int(name: str) -> int | None:
    return None if env_opt(name) is None else env_int(name, 0)


def from_env() -> AgentSettings:
    node_id = env_opt("RP_NODE_ID") or default_node_id()
    if not is_valid_id(node_id):
        raise SettingsError(f"RP_NODE_ID must use 1-128 of A-Z a-z 0-9 _ -, got {node_id!r}")
    ping_interval_ms = env_int("RP_WORKER_PING_INTERVAL_MS", 5000)
    settings = AgentSettings(
        nats_url=env_str("RP_NATS_URL", "nats://127.0.0.1:4222"),
        node_id=node_id,
        host=env_str("RP_AGENT_HOST", "127.0.0.1"),
        port=env_int("RP_AGENT_PORT", 8100),
        url=env_opt("RP_AGENT_URL"),
        runtime=env_str("RP_RUNTIME", "process"),
        worker_memory_mb=env_int("RP_WORKER_MEMORY_MB", 0),
        worker_cpus=env_float("RP_WORKER_CPUS", 0.0),
        disk_path=env_str("RP_DISK_PATH", "/"),
        ack_wait_s=env_float("RP_ACK_WAIT_S", 30.0),
        max_attempts=env_int("RP_MAX_ATTEMPTS", 3),
        as_sent_window_ms=env_int("RP_AS_SENT_WINDOW_MS", 50),
        claim_delay_ms=env_int("RP_CLAIM_DELAY_MS", 20),
        heartbeat_s=env_float("RP_HEARTBEAT_S", 1.0),
        worker_ping_interval_ms=ping_interval_ms,
        worker_ping_timeout_s=env_float("RP_WORKER_PING_TIMEOUT_S", 3 * ping_interval_ms / 1000),
        stop_grace_s=env_float("RP_STOP_GRACE_S", 5.0),
        take_poll_s=env_float("RP_TAKE_POLL_S", 20.0),
        shutdown_grace_s=env_float("RP_SHUTDOWN_GRACE_S", 30.0),
        flash_pause_s=env_float("RP_FLASH_PAUSE_S", 1.0),
        park_memory_mb=env_opt_int("RP_PARK_MEMORY_MB"),
        snapshots=env_bool("RP_SNAPSHOTS", True),
        snapshot_gc_s=env_float("RP_SNAPSHOT_GC_S", 300.0),
    )
    check(settings)
    return settings


def check(settings: AgentSettings) -> None:
    """Raise SettingsError for values the agent cannot work with."""
    if not 0 < settings.take_poll_s < WORKER_TAKE_TIMEOUT_S:
        raise SettingsError(f"RP_TAKE_POLL_S must be between 0 and {WORKER_TAKE_TIMEOUT_S:g}")
    if settings.ack_wait_s <= 0:
        raise SettingsError("RP_ACK_WAIT_S must be positive")
    if settings.max_attempts < 1:
        raise SettingsError("RP_MAX_ATTEMPTS must be at least 1")
    if settings.heartbeat_s <= 0:
        raise SettingsError("RP_HEARTBEAT_S must be positive")
    if settings.worker_ping_interval_ms < 1000:
        # The runpod SDK integer-divides the interval to seconds: <1000 busy-loops.
        raise SettingsError("RP_WORKER_PING_INTERVAL_MS must be at least 1000")
    if not 0 <= settings.port < 65536:
        raise SettingsError("RP_AGENT_PORT must be a port number")
    if settings.runtime not in RUNTIMES:
        raise SettingsError(f"RP_RUNTIME must be one of {', '.join(RUNTIMES)}, got {settings.runtime!r}")
    if settings.runtime != "process" and settings.port == 0 and not settings.url:
        # Containers outlive the agent and keep the URL they were given: it must not change.
        raise SettingsError(f"RP_RUNTIME={settings.runtime} needs a fixed RP_AGENT_PORT (or RP_AGENT_URL), "
                            "not 0")
    if settings.park_memory_mb is not None and settings.park_memory_mb < 0:
        raise SettingsError("RP_PARK_MEMORY_MB must not be negative")
    if settings.worker_memory_mb < 0 or settings.worker_cpus < 0:
        raise SettingsError("RP_WORKER_MEMORY_MB and RP_WORKER_CPUS must not be negative")
