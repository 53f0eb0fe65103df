"""Sample the world for the policy: queue depth and age from JetStream, workers from node status."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from nats.js.errors import NotFoundError

from runplane_autoscaler.policy import Signals
from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.nodes import NodeStatus


def worker_counts(nodes: Iterable[NodeStatus], now_ms: int, node_loss_timeout_ms: int) -> dict[str, Signals]:
    """Workers per endpoint on nodes whose heartbeat is fresh (only the worker fields are set).

    A stopping worker is not counted; a worker holding a job (or `running`) is busy.
    """
    counts: dict[str, list[int]] = {}
    for node in nodes:
        if now_ms - node.heartbeat_at_ms > node_loss_timeout_ms:
            continue
        for worker in node.workers:
            if worker.state == "stopping":
                continue
            total_busy_idle = counts.setdefault(worker.endpoint_id, [0, 0, 0])
            total_busy_idle[0] += 1
            if worker.state == "running" or worker.jobs:
                total_busy_idle[1] += 1
            elif worker.state == "idle":
                total_busy_idle[2] += 1
    return {
        ep: Signals(workers_total=total, workers_busy=busy, workers_idle=idle)
        for ep, (total, busy, idle) in counts.items()
    }


@dataclass(frozen=True)
class QueueSample:
    """Queue depth, in-flight count and oldest queued time of one endpoint, from its consumer."""

    in_queue: int
    in_progress: int
    oldest_queued_at_ms: int | None


async def sample_queue(bus: Bus, endpoint_id: str, *, ack_wait_s: float) -> QueueSample:
    """Read the endpoint's durable consumer (creating it if missing) and its oldest queued message."""
    durable = subjects.job_consumer(endpoint_id)
    try:
        info = await bus.js.consumer_info(subjects.STREAM_JOBS, durable)
    except NotFoundError:
        await bus.ensure_job_consumer(endpoint_id, ack_wait_s=ack_wait_s)
        info = await bus.js.consumer_info(subjects.STREAM_JOBS, durable)
    queued = info.num_pending or 0
    oldest_at_ms: int | None = None
    if queued:
        next_seq = (info.delivered.stream_seq if info.delivered else 0) + 1
        try:
            msg = await bus.js.get_msg(subjects.STREAM_JOBS, seq=next_seq,
                                       subject=subjects.job_queue(endpoint_id), next=True)
        except NotFoundError:  # taken between the two reads
            msg = None
        if msg is not None and msg.time is not None:
            oldest_at_ms = int(msg.time.timestamp() * 1000)
    return QueueSample(queued, info.num_ack_pending or 0, oldest_at_ms)


async def sample(bus: Bus, endpoint_ids: Iterable[str], now_ms: int, *, ack_wait_s: float,
                 node_loss_timeout_ms: int) -> tuple[dict[str, Signals], dict[str, BaseException]]:
    """Signals for each endpoint; endpoints whose queue could not be read are returned as errors."""
    nodes = [status async for _, status in bus.nodes.items()]
    workers = worker_counts(nodes, now_ms, node_loss_timeout_ms)
    ids = list(endpoint_ids)
    results = await asyncio.gather(*(sample_queue(bus, ep, ack_wait_s=ack_wait_s) for ep in ids),
                                   return_exceptions=True)
    signals: dict[str, Signals] = {}
    errors: dict[str, BaseException] = {}
    for ep, result in zip(ids, results, strict=True):
        if isinstance(result, BaseException):
            errors[ep] = result
            continue
        w = workers.get(ep, Signals())
        age_ms = 0 if result.oldest_queued_at_ms is None else max(0, now_ms - result.oldest_queued_at_ms)
        signals[ep] = Signals(
            in_queue=result.in_queue, in_progress=result.in_progress, oldest_queued_age_ms=age_ms,
            workers_total=w.workers_total, workers_busy=w.workers_busy, workers_idle=w.workers_idle,
        )
    return signals, errors
