"""Prometheus metrics of the node agent (`rp_node_agent_*`), served on /metrics."""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram
from runplane_proto.timings import Phases

JOBS_TAKEN = Counter("rp_node_agent_jobs_taken_total", "Jobs handed to workers", ["endpoint"])
JOBS_FINISHED = Counter("rp_node_agent_jobs_finished_total", "Jobs this agent made terminal or saw end",
                        ["endpoint", "status"])
JOBS_REQUEUED = Counter("rp_node_agent_jobs_requeued_total", "Jobs released back to the queue",
                        ["endpoint", "reason"])
JOBS_SKIPPED = Counter("rp_node_agent_jobs_skipped_total", "Queue messages acked without running",
                       ["endpoint", "reason"])
MESSAGES_NAKED = Counter("rp_node_agent_messages_naked_total",
                         "Queue messages fetched with nobody left to take them")
JOB_EXECUTION_SECONDS = Histogram(
    "rp_node_agent_job_execution_seconds", "Time from hand-over to result", ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
JOB_PHASE_SECONDS = Histogram(
    "rp_node_agent_job_phase_seconds",
    "Where a finished job's time went (queued, waiting_for_capacity, worker_start, handler, result_upload; "
    "the same figures as /status timings)", ["endpoint", "phase"], buckets=_PHASE_BUCKETS,
)
JOB_WORKER_START_SECONDS = Histogram(
    "rp_node_agent_job_worker_start_seconds",
    "The worker start a finished job waited through, by kind (cold, snapshot, flash, warm)",
    ["endpoint", "kind"], buckets=_PHASE_BUCKETS,
)
STREAM_CHUNKS = Counter("rp_node_agent_stream_chunks_total", "Stream chunks stored", ["endpoint"])
TAKE_POLLS_WAITING = Gauge("rp_node_agent_take_polls_waiting", "Worker take long-polls now waiting")
JOBS_HELD = Gauge("rp_node_agent_jobs_held", "Jobs held by this agent's workers")
WORKERS = Gauge("rp_node_agent_workers", "Workers on this node by state", ["state"])
WORKER_STARTS = Counter("rp_node_agent_worker_starts_total", "Worker processes started", ["endpoint"])
WORKER_EXITS = Counter("rp_node_agent_worker_exits_total", "Worker processes that ended", ["endpoint", "why"])
WORKER_REQUESTS_REJECTED = Counter("rp_node_agent_worker_requests_rejected_total",
                                   "Worker API calls refused", ["code"])
COMMANDS = Counter("rp_node_agent_commands_total", "Node commands handled", ["command", "ok"])
STATUS_WRITES = Counter("rp_node_agent_status_writes_total", "NodeStatus writes to KV")
FLASH_PAUSES = Counter("rp_node_agent_flash_pauses_total", "Idle workers paused (flash boot)")
FLASH_RESUME_SECONDS = Histogram(
    "rp_node_agent_flash_resume_seconds", "Time to resume a paused worker",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
FLASH_PARKS = Counter("rp_node_agent_flash_parks_total", "Idle workers parked instead of stopped")
FLASH_UNPARKS = Counter("rp_node_agent_flash_unparks_total", "Parked workers that became live again", ["why"])
FLASH_EVICTIONS = Counter("rp_node_agent_flash_evictions_total", "Parked workers evicted", ["why"])
FLASH_SNAPSHOTS = Counter("rp_node_agent_flash_snapshots_total", "Snapshot commits", ["result"])
LOOP_ERRORS = Counter("rp_node_agent_loop_errors_total", "Errors caught in background loops", ["loop"])


# Labelled children looked up once per endpoint, not on every job.
@lru_cache(maxsize=4096)
def taken(endpoint: str) -> Counter:
    return JOBS_TAKEN.labels(endpoint=endpoint)


@lru_cache(maxsize=16384)
def finished(endpoint: str, status: str) -> Counter:
    return JOBS_FINISHED.labels(endpoint=endpoint, status=status)


@lru_cache(maxsize=4096)
def execution(endpoint: str) -> Histogram:
    return JOB_EXECUTION_SECONDS.labels(endpoint=endpoint)


@lru_cache(maxsize=4096)
def chunks(endpoint: str) -> Counter:
    return STREAM_CHUNKS.labels(endpoint=endpoint)


@lru_cache(maxsize=16384)
def _phase(endpoint: str, phase: str) -> Histogram:
    return JOB_PHASE_SECONDS.labels(endpoint=endpoint, phase=phase)


@lru_cache(maxsize=16384)
def _worker_start(endpoint: str, kind: str) -> Histogram:
    return JOB_WORKER_START_SECONDS.labels(endpoint=endpoint, kind=kind)


def job_phases(endpoint: str, p: Phases) -> None:
    """Observe a job that ended with a result (no NATS, a few histogram updates)."""
    _phase(endpoint, "queued").observe(p.queued_ms / 1000)
    for phase, value in (("waiting_for_capacity", p.waiting_for_capacity_ms),
                         ("worker_start", p.worker_start_ms), ("handler", p.handler_ms),
                         ("result_upload", p.result_upload_ms)):
        if value is not None:
            _phase(endpoint, phase).observe(value / 1000)
    if p.start_kind is not None and p.worker_start_ms is not None:
        _worker_start(endpoint, p.start_kind).observe(p.worker_start_ms / 1000)
