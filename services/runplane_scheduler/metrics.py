"""The scheduler's Prometheus metrics (served on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TICKS = Counter("rp_scheduler_ticks_total", "Placement loop iterations")
ERRORS = Counter("rp_scheduler_errors_total", "Failed loop steps (the loop continues)", ["step"])
TICK_SECONDS = Histogram("rp_scheduler_tick_seconds", "Time one placement iteration took",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
COMMANDS = Counter("rp_scheduler_commands_total", "Commands sent to nodes", ["command", "result"])
NODES_ALIVE = Gauge("rp_scheduler_nodes_alive", "Nodes with a fresh heartbeat")
NODES_LOST = Counter("rp_scheduler_nodes_lost_total", "Nodes declared lost (heartbeat too old)")
PENDING_STARTS = Gauge("rp_scheduler_pending_starts", "Starts sent that no node reported yet")
START_TIMEOUTS = Counter("rp_scheduler_start_timeouts_total", "Starts a node accepted but never reported")
UNPLACED = Gauge("rp_scheduler_unplaced_workers", "Workers wanted that no node can take", ["endpoint"])
JANITOR_SWEEPS = Counter("rp_scheduler_janitor_sweeps_total", "Janitor passes over the job records")
JANITOR_EXPIRED = Counter("rp_scheduler_janitor_expired_jobs_total", "Queued jobs timed out by their TTL")
JANITOR_DELETED = Counter("rp_scheduler_janitor_deleted_records_total",
                          "Terminal job records deleted after their result retention")
