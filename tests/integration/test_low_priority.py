"""Low-priority jobs on the bus: their own queue under the endpoint's one consumer (FIFO with
the normal queue), consumers of older versions widened in place, retries on the same queue,
and node agents reporting which of a worker's jobs are low priority."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import msgspec
import nats.js.api as api
from node_agent_harness import fast_spec, running_agent, start_worker, submit, wait_record, wait_worker_state
from runplane_bus import Bus, BusSettings
from runplane_gateway.app import Gateway
from runplane_gateway.settings import GatewaySettings
from runplane_proto import subjects
from runplane_proto.jobs import JobQueued
from runplane_proto.codec import Codec

KEY = "test-admin-key"
QUEUED: Codec[JobQueued] = Codec(JobQueued)


async def old_consumer(bus: Bus, endpoint_id: str, *, ack_wait_s: float = 7.0) -> None:
    """The consumer an older version made: the normal queue only."""
    await bus.js.add_consumer(subjects.STREAM_JOBS, api.ConsumerConfig(
        durable_name=subjects.job_consumer(endpoint_id), filter_subject=subjects.job_queue(endpoint_id),
        ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait_s, max_deliver=-1, max_ack_pending=-1,
        deliver_policy=api.DeliverPolicy.ALL))


async def test_an_older_single_filter_consumer_is_widened_in_place(nats_server):
    bus = await Bus.connect(BusSettings(url=nats_server.url, name="test"))
    ep = "oldconsumer"
    try:
        await old_consumer(bus, ep)
        for job in ("a", "b"):
            await bus.publish_durable(subjects.job_queue(ep), JobQueued(
                job_id=job, endpoint_id=ep, submitted_at_ms=1), msg_id=f"{job}:0")
        sub = await bus.js.pull_subscribe_bind(durable=subjects.job_consumer(ep), stream=subjects.STREAM_JOBS)
        [held] = await sub.fetch(1, timeout=5)  # in flight across the upgrade

        await bus.ensure_job_consumer(ep, ack_wait_s=30)
        info = await bus.js.consumer_info(subjects.STREAM_JOBS, subjects.job_consumer(ep))
        assert sorted(info.config.filter_subjects) == sorted(subjects.job_queues(ep))
        assert info.config.ack_wait == 7.0  # the first creator's settings stay
        # Same position: the job in flight is not handed out again, the next one still waits.
        assert (info.num_ack_pending, info.num_pending) == (1, 1)

        await bus.publish_durable(subjects.job_queue(ep, low_priority=True), JobQueued(
            job_id="c", endpoint_id=ep, submitted_at_ms=2, low_priority=True), msg_id="c:0")
        msgs = await sub.fetch(2, timeout=5)
        assert [QUEUED.decode(m.data).job_id for m in msgs] == ["b", "c"]
        assert msgs[1].subject == subjects.job_queue(ep, low_priority=True)
        for msg in (held, *msgs):
            await msg.ack_sync()
        await bus.ensure_job_consumer(ep)  # current: nothing to do
        again = await bus.js.consumer_info(subjects.STREAM_JOBS, subjects.job_consumer(ep))
        assert again.config == info.config and again.num_pending == 0 and again.num_ack_pending == 0
        await sub.unsubscribe()
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def gateway(nats_url: str) -> AsyncIterator[tuple[Bus, httpx.AsyncClient]]:
    bus = await Bus.connect(BusSettings(url=nats_url, name="gateway"))
    gw = await Gateway.start(bus, GatewaySettings(api_key=KEY))
    transport = httpx.ASGITransport(app=gw.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:
            yield bus, http
    finally:
        await gw.stop()
        await bus.close()


async def test_low_priority_jobs_reach_an_older_consumer_in_order_and_retry_on_their_queue(nats_server):
    async with gateway(nats_server.url) as (bus, http):
        resp = await http.post("/v1/endpoints", json={"name": "lp", "command": ["true"]})
        ep = resp.json()["id"]
        # An endpoint from before the upgrade: its consumer takes the normal queue only.
        await bus.delete_job_consumer(ep)
        await old_consumer(bus, ep)

        low = (await http.post(f"/v2/{ep}/run", json={"input": 1, "policy": {"lowPriority": True}})).json()["id"]
        normal = (await http.post(f"/v2/{ep}/run", json={"input": 2})).json()["id"]
        sub = await bus.js.pull_subscribe_bind(durable=subjects.job_consumer(ep), stream=subjects.STREAM_JOBS)
        msgs = await sub.fetch(2, timeout=5)
        # The gateway widened the consumer before the first low-priority job, so it is not
        # skipped, and both queues are one FIFO.
        assert [QUEUED.decode(m.data).job_id for m in msgs] == [low, normal]
        assert [m.subject for m in msgs] == [subjects.job_queue(ep, low_priority=True), subjects.job_queue(ep)]
        assert QUEUED.decode(msgs[0].data).low_priority
        for msg in msgs:
            await msg.ack_sync()

        await bus.jobs.modify(subjects.job_key(ep, low), lambda r: msgspec.structs.replace(
            r, status="FAILED", error="x", completed_at_ms=r.submitted_at_ms + 1))
        assert (await http.post(f"/v2/{ep}/retry/{low}")).json() == {"id": low, "status": "IN_QUEUE"}
        [retried] = await sub.fetch(1, timeout=5)
        assert retried.subject == subjects.job_queue(ep, low_priority=True)
        assert retried.headers["Nats-Msg-Id"] == f"{low}:1"
        await retried.ack_sync()
        await sub.unsubscribe()


async def test_node_status_names_the_low_priority_jobs_a_worker_holds(nats_server):
    async with running_agent(nats_server.url) as agent:
        bus = agent.bus
        node = agent.settings.node_id
        spec = fast_spec("lpagent")
        worker = await start_worker(bus, node, spec)

        normal = await submit(bus, spec.id, {"sleep": 1.0})
        info = await wait_worker_state(bus, node, worker, "running", where=lambda w: w.jobs == [normal])
        assert info.low_priority_jobs == []
        await wait_record(bus, spec.id, normal, "COMPLETED")

        low = await submit(bus, spec.id, {"sleep": 1.0}, low_priority=True)
        info = await wait_worker_state(bus, node, worker, "running", where=lambda w: w.jobs == [low])
        assert info.low_priority_jobs == [low]
        await wait_record(bus, spec.id, low, "COMPLETED")
        info = await wait_worker_state(bus, node, worker, "idle")
        assert info.jobs == [] and info.low_priority_jobs == []
