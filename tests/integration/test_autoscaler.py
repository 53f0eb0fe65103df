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


async def queue_jobs(bus: Bus, endpoint_id: str, n: int) -> None:
    for i in range(n):
        await bus.publish_durable(subjects.job_queue(endpoint_id), JobQueued(
            job_id=f"job{i}", endpoint_id=endpoint_id, submitted_at_ms=now_ms()), msg_id=f"job{i}:0")


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
        await async_wait_until(lambda: _async(scaler.ticks >= ticks + 3), what="3 more rounds")
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


async def _async(value):
    return value
