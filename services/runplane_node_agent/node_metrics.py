"""Metrics read from the node's state when Prometheus scrapes (GPU utilisation and memory per
GPU, workers by endpoint and state), and the dispatch latency of the jobs handed to workers.

Labelled with `node` so a dashboard can group by node without relabelling."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from runplane_node_agent.node_status import StatusPublisher
    from runplane_node_agent.supervisor import Supervisor

MB = 1024 * 1024

DISPATCH_SECONDS = Histogram(
    "rp_node_agent_job_dispatch_seconds",
    "From submission to the hand-over to a worker (queue wait, and cold start when a worker had to start)",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


WORKER_START_SECONDS = Histogram(
    "rp_node_agent_worker_start_seconds",
    "From starting a worker's process or container to its first take poll (cold start; `snapshot` "
    "when started from its endpoint's snapshot image; resuming a paused worker is "
    "rp_node_agent_flash_resume_seconds)",
    ["kind"],
    buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120, 300),
)


def worker_ready(startup_ms: int, *, from_snapshot: bool) -> None:
    kind = "snapshot" if from_snapshot else "cold"
    WORKER_START_SECONDS.labels(kind=kind).observe(max(0, startup_ms) / 1000)


@lru_cache(maxsize=4096)
def _dispatch(endpoint: str) -> Histogram:
    return DISPATCH_SECONDS.labels(endpoint=endpoint)


def dispatched(endpoint_id: str, submitted_at_ms: int, started_at_ms: int | None) -> None:
    if started_at_ms is not None:
        _dispatch(endpoint_id).observe(max(0, started_at_ms - submitted_at_ms) / 1000)


class NodeCollector(Collector):
    def __init__(self, node_id: str, status: StatusPublisher, supervisor: Supervisor) -> None:
        self.node_id = node_id
        self.status = status
        self.supervisor = supervisor

    def describe(self) -> list[Metric]:
        return []  # no fixed names: several agents in one process (tests) may each register one

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "gpu", "uuid", "name"]
        utilization = GaugeMetricFamily("rp_node_agent_gpu_utilization_percent",
                                        "GPU utilisation (NVML, last heartbeat)", labels=labels)
        used = GaugeMetricFamily("rp_node_agent_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        total = GaugeMetricFamily("rp_node_agent_gpu_memory_total_bytes", "GPU memory", labels=labels)
        held = GaugeMetricFamily("rp_node_agent_gpu_assigned",
                                 "1 when a worker (parked ones too) holds the GPU",
                                 labels=[*labels, "endpoint"])
        live = list(self.supervisor.workers.values())
        holders = {uuid: w.endpoint_id for w in live for uuid in w.gpu_uuids}
        for gpu in self.status.gpus.gpus:
            values = [self.node_id, str(gpu.index), gpu.uuid, gpu.name]
            utilization.add_metric(values, gpu.utilization_pct)
            used.add_metric(values, gpu.memory_used_mb * MB)
            total.add_metric(values, gpu.memory_total_mb * MB)
            held.add_metric([*values, holders.get(gpu.uuid, "")], 1 if gpu.uuid in holders else 0)
        workers = GaugeMetricFamily("rp_node_agent_endpoint_workers",
                                    "Workers on this node by endpoint and state",
                                    labels=["node", "endpoint", "state"])
        for (endpoint, state), n in sorted(Tally((w.endpoint_id, w.state) for w in live).items()):
            workers.add_metric([self.node_id, endpoint, state], n)
        yield from (utilization, used, total, held, workers)
