"""The autoscaler against a real nats-server: jobs on the JOBS stream move the ScaleTarget."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import REGISTRY
from runplane_autoscaler.loop import Autoscaler
from runplane_autoscaler.settings import AutoscalerSettings
from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.jobs import JobQueued
from runplane_proto.nodes import NodeStatus, WorkerInfo
from runplane_proto.scaling import ScaleTarget
from runplane_testing.natsserver import env_with, free_port
from runplane_testing.waiting import async_wait_until

SETTINGS = AutoscalerSettings(interval_s=0.1)


def now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.asynccontextmanager
async def autoscaler(nats_url: str) -> AsyncIterator[tuple[Bus, Autoscaler]]:
    bus = await Bus.connect(BusSettings(url=nats_url, name="test"))
    service_bus = await Bus.connect(BusSettings(url=nats_url, name="autoscaler"))
    scaler = Autoscaler(service_bus, SETTINGS)
    stop = asyncio.Event()
    task = asyncio.create_task(scaler.run(stop))
    try:
        yield bus, scaler
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await service_bus.close()
        await bus.close()


async def target_is(bus: Bus, endpoint_id: str, desired: int, *, timeout_s: float = 10.0) -> ScaleTarget:
    async def check() -> ScaleTarget | None:
        got = await bus.scale.get(subjects.scale_key(endpoint_id))
        return got.value if got is not None and got.value.desired_workers == desired else None

    return await async_wait_until(check, timeout_s=timeout_s, what=f"{endpoint_id} target {desired}")


async def queue_jobs(bus: Bus, endpoint_id: str, n: int, *, low_priority: bool = False,
                     prefix: str = "job") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for job_id in ids:
        await bus.publish_durable(subjects.job_queue(endpoint_id, low_priority=low_priority), JobQueued(
            job_id=job_id, endpoint_id=endpoint_id, submitted_at_ms=now_ms(), low_priority=low_priority),
            msg_id=f"{job_id}:0")
    return ids


async def rounds(scaler: Autoscaler, n: int) -> None:
    """Wait until the autoscaler ran `n` more rounds."""
    ticks = scaler.ticks
    await async_wait_until(lambda: (scaler.ticks >= ticks + n), what=f"{n} more rounds")


def gauges(endpoint_id: str) -> dict[str, float | None]:
    """The job counts the (in-process) autoscaler last sampled, from its metrics."""
    names = {"queued": "rp_autoscaler_queued_jobs", "in_progress": "rp_autoscaler_in_progress_jobs",
             "low_queued": "rp_autoscaler_low_priority_queued_jobs",
             "low_in_progress": "rp_autoscaler_low_priority_in_progress_jobs"}
    return {key: REGISTRY.get_sample_value(name, {"endpoint": endpoint_id}) for key, name in names.items()}


async def report_worker(bus: Bus, endpoint_id: str, jobs: list[str], low: list[str]) -> None:
    """A live node whose one worker of the endpoint holds `jobs` (those in `low` low priority)."""
    worker = WorkerInfo(worker_id="w1", endpoint_id=endpoint_id, state="running" if jobs else "idle",
                        started_at_ms=now_ms(), jobs=jobs, low_priority_jobs=low)
    await bus.nodes.put("n1", NodeStatus(node_id="n1", hostname="n1", runtime="fake",
                                         heartbeat_at_ms=now_ms(), workers=[worker]))


async def test_queued_jobs_scale_from_zero_and_idle_brings_it_back(nats_server):
    async with autoscaler(nats_server.url) as (bus, scaler):
        await bus.endpoints.put("ep1", EndpointSpec(
            id="ep1", name="ep1", workers_min=0, workers_max=5, scaler_type="REQUEST_COUNT", scaler_value=1,
            idle_timeout_s=1))
        await target_is(bus, "ep1", 0)  # the consumer is created and a first target written

        await queue_jobs(bus, "ep1", 3)
        up = await target_is(bus, "ep1", 3)
        assert up.reason.startswith("scale up") and up.last_active_at_ms > 0

        # A worker takes the jobs: in progress still counts.
        sub = await bus.js.pull_subscribe_bind(durable=subjects.job_consumer("ep1"),
                                               stream=subjects.STREAM_JOBS)
        msgs = await sub.fetch(3, timeout=5)
        ticks = scaler.ticks
        await async_wait_until(lambda: (scaler.ticks >= ticks + 3), what="3 more rounds")
        assert (await bus.scale.get("ep1")).value.desired_workers == 3

        for msg in msgs:
            await msg.ack_sync()
        done_at_ms = now_ms()
        down = await target_is(bus, "ep1", 2)
        # Not before the idle timeout (1 s) since the last sample that saw work.
        assert down.decided_at_ms >= done_at_ms + 1_000 - 200
        assert down.reason.startswith("scale down")
        await target_is(bus, "ep1", 0)
        await sub.unsubscribe()


async def test_queue_delay_adds_a_worker_when_a_job_waits_too_long(nats_server):
    async with autoscaler(nats_server.url) as (bus, _):
        await bus.endpoints.put("ep2", EndpointSpec(
            id="ep2", name="ep2", workers_min=1, workers_max=3, scaler_type="QUEUE_DELAY", scaler_value=1,
            idle_timeout_s=1))
        await target_is(bus, "ep2", 1)
        # One busy worker on a live node; a job waits behind it.
        busy = WorkerInfo(worker_id="w1", endpoint_id="ep2", state="running", started_at_ms=now_ms(),
                          jobs=["x"])
        await bus.nodes.put("n1", NodeStatus(node_id="n1", hostname="n1", runtime="fake",
                                             heartbeat_at_ms=now_ms(), workers=[busy]))
        queued_at_ms = now_ms()
        await queue_jobs(bus, "ep2", 1)
        up = await target_is(bus, "ep2", 2)
        assert up.decided_at_ms >= queued_at_ms + 1_000 - 100  # only once it waited > 1 s
        assert "waited" in up.reason


async def test_low_priority_jobs_never_scale_up_but_run_on_the_worker_normal_work_brings(nats_server):
    async with autoscaler(nats_server.url) as (bus, scaler):
        await bus.endpoints.put("lp1", EndpointSpec(
            id="lp1", name="lp1", workers_min=0, workers_max=5, scaler_type="REQUEST_COUNT", scaler_value=1,
            idle_timeout_s=1))
        await target_is(bus, "lp1", 0)
        low = await queue_jobs(bus, "lp1", 3, low_priority=True, prefix="low")
        await rounds(scaler, 10)
        held = (await bus.scale.get("lp1")).value
        assert held.desired_workers == 0 and held.last_scale_up_at_ms == 0, held.reason
        assert gauges("lp1") == {"queued": 0, "in_progress": 0, "low_queued": 3, "low_in_progress": 0}

        normal = await queue_jobs(bus, "lp1", 1, prefix="normal")
        up = await target_is(bus, "lp1", 1)
        assert "1 queued" in up.reason, up.reason
        # The worker takes all four in order and reports the low-priority ones: still one worker.
        sub = await bus.js.pull_subscribe_bind(durable=subjects.job_consumer("lp1"), stream=subjects.STREAM_JOBS)
        msgs = await sub.fetch(4, timeout=5)
        assert [m.subject for m in msgs] == [subjects.job_queue("lp1", low_priority=True)] * 3 + [
            subjects.job_queue("lp1")]
        await report_worker(bus, "lp1", low + normal, low)
        await rounds(scaler, 10)
        assert (await bus.scale.get("lp1")).value.desired_workers == 1
        assert gauges("lp1") == {"queued": 0, "in_progress": 1, "low_queued": 0, "low_in_progress": 3}
        await msgs[3].ack_sync()  # the normal job is done; low-priority work keeps the worker
        await report_worker(bus, "lp1", low, low)
        await rounds(scaler, 20)  # 2 s, twice the idle timeout
        assert (await bus.scale.get("lp1")).value.desired_workers == 1
        assert gauges("lp1") == {"queued": 0, "in_progress": 0, "low_queued": 0, "low_in_progress": 3}
        for msg in msgs[:3]:
            await msg.ack_sync()
        await report_worker(bus, "lp1", [], [])
        done_at_ms = now_ms()
        down = await target_is(bus, "lp1", 0)
        assert down.decided_at_ms >= done_at_ms + 1_000 - 200
        await sub.unsubscribe()


async def test_queue_delay_measures_the_wait_of_normal_jobs_only(nats_server):
    async with autoscaler(nats_server.url) as (bus, scaler):
        await bus.endpoints.put("lp2", EndpointSpec(
            id="lp2", name="lp2", workers_min=1, workers_max=3, scaler_type="QUEUE_DELAY", scaler_value=1,
            idle_timeout_s=1))
        await target_is(bus, "lp2", 1)
        await report_worker(bus, "lp2", ["x"], [])  # the one worker is busy
        await queue_jobs(bus, "lp2", 1, low_priority=True, prefix="low")
        await rounds(scaler, 25)  # the low-priority job waited 2.5 s > scalerValue
        assert (await bus.scale.get("lp2")).value.desired_workers == 1
        await report_worker(bus, "lp2", ["x"], [])  # keep the node fresh
        queued_at_ms = now_ms()
        await queue_jobs(bus, "lp2", 1, prefix="normal")
        up = await target_is(bus, "lp2", 2)
        # Measured from the normal job, not from the older low-priority one in front of it.
        assert up.decided_at_ms >= queued_at_ms + 1_000 - 100, up.reason


async def test_an_older_consumer_is_widened_by_the_autoscaler(nats_server):
    import nats.js.api as api

    async with autoscaler(nats_server.url) as (bus, _):
        await bus.js.add_consumer(subjects.STREAM_JOBS, api.ConsumerConfig(
            durable_name=subjects.job_consumer("lp3"), filter_subject=subjects.job_queue("lp3"),
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=9, max_deliver=-1, max_ack_pending=-1))
        await bus.endpoints.put("lp3", EndpointSpec(id="lp3", name="lp3", workers_min=0))

        async def widened():
            info = await bus.js.consumer_info(subjects.STREAM_JOBS, subjects.job_consumer("lp3"))
            return info if sorted(info.config.filter_subjects or []) == sorted(subjects.job_queues("lp3")) \
                else None

        info = await async_wait_until(widened, what="consumer widened")
        assert info.config.ack_wait == 9


async def test_a_deleted_endpoint_loses_its_target(nats_server):
    async with autoscaler(nats_server.url) as (bus, _):
        await bus.endpoints.put("ep3", EndpointSpec(id="ep3", name="ep3", workers_min=2))
        await target_is(bus, "ep3", 2)
        await bus.endpoints.delete("ep3")

        async def gone() -> bool:
            return await bus.scale.get("ep3") is None

        await async_wait_until(gone, what="target deleted")


@pytest.mark.timeout(60)
async def test_the_service_process_serves_metrics_and_writes_targets(nats_server):
    port = free_port()
    env = env_with(RP_NATS_URL=nats_server.url, RP_METRICS_PORT=str(port), RP_AUTOSCALE_INTERVAL_S="0.1",
                   RP_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "runplane_autoscaler"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    bus = await Bus.connect(BusSettings(url=nats_server.url, name="test"))
    try:
        await bus.endpoints.put("ep4", EndpointSpec(id="ep4", name="ep4", workers_min=1))
        await target_is(bus, "ep4", 1, timeout_s=30)

        async def metrics() -> str:
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
                return (await http.get(f"http://127.0.0.1:{port}/metrics")).text

        text = await async_wait_until(metrics, what="/metrics")
        assert 'rp_autoscaler_desired_workers{endpoint="ep4"} 1.0' in text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
        await bus.close()
    assert proc.returncode == 0, err.decode()[-3000:]


async def test_consumers_are_read_in_pages_and_every_endpoint_is_sampled(nats_server):
    """More endpoints than one consumer-list page (256): every queue is still sampled."""
    from runplane_autoscaler.signals import CONSUMER_PAGE, job_consumer_infos, sample

    bus = await Bus.connect(BusSettings(url=nats_server.url, name="test"))
    try:
        ids = [f"page{i:03d}" for i in range(CONSUMER_PAGE + 20)]
        await asyncio.gather(*(bus.ensure_job_consumer(ep) for ep in ids))
        await queue_jobs(bus, ids[-1], 2)
        infos = await job_consumer_infos(bus)
        assert {subjects.job_consumer(ep) for ep in ids} <= set(infos)
        signals, errors = await sample(bus, ids, now_ms(), ack_wait_s=30, node_loss_timeout_ms=10_000, nodes=[])
        assert errors == {} and set(signals) == set(ids)
        assert signals[ids[-1]].in_queue == 2 and signals[ids[0]].in_queue == 0
    finally:
        await bus.close()
