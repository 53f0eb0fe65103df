"""A first attempt's claim (IN_PROGRESS) is written RP_CLAIM_DELAY_MS after its hand-over, so a
job that ends sooner is stored twice (queued, then ended) rather than three times. Whatever
needs the claim before then (progress, a chunk, a cancel, a lost worker) gets it at once, and
the attempt is counted either way. Driven by hand over the worker protocol, with the stored
writes read off the bucket's republish subject."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest
import pytest_asyncio
from node_agent_harness import output_of, record_of, running_agent, submit, wait_record, worker_pid
from runplane_proto.codec import Codec
from runplane_proto.jobs import JobRecord
from runplane_testing.waiting import async_wait_until
from test_node_agent_worker_api import (
    cancel_like_the_gateway,
    collect_events,
    consumer_settled,
    hand_worker,
    stops_offered,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
# Longer than any test here: the claim is only ever written because something needed it.
AGENT_OPTIONS = {"take_poll_s": 1.0, "as_sent_window_ms": 60_000, "claim_delay_ms": 600_000}
RECORD: Codec[JobRecord] = Codec(JobRecord)


@pytest_asyncio.fixture(loop_scope="module")
async def http():
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def stored_statuses(bus, endpoint_id: str, job_id: str) -> list[str]:
    """Every status stored in the job's record from now on: the bucket republishes each write
    it stored (a write refused for its revision is not)."""
    written: list[str] = []

    async def on_write(msg) -> None:
        record = RECORD.decode(msg.data) if msg.data else None
        if record is not None and record.id == job_id:
            written.append(record.status)
    await bus.nc.subscribe(f"rp.jobrec.{endpoint_id}.>", cb=on_write)
    await bus.nc.flush()
    return written


async def heard(writes: list[str], last: str) -> None:
    """Until the republished write of `last` has arrived (it may trail a read of the record)."""
    await async_wait_until(lambda: bool(writes) and writes[-1] == last, what=f"the {last} write heard")


async def test_a_job_ending_within_the_delay_is_stored_queued_then_ended(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    for take_path in ("first delivery, as sent", "stored record read first"):
        job_id = f"job-{take_path[:5]}-{os.urandom(4).hex()}-r1"
        writes = await stored_statuses(bus, ep, job_id)
        events: list = []
        await collect_events(bus, job_id, events)
        await submit(bus, ep, {"n": 1}, job_id=job_id, embed=take_path.startswith("first"))
        taken = await worker.take(http)
        assert taken.status_code == 200 and taken.json()["id"] == job_id
        assert (await record_of(bus, ep, job_id)).status == "IN_QUEUE"  # the claim waits
        assert (await worker.done(http, job_id, {"output": "quick"})).status_code == 200
        record = await wait_record(bus, ep, job_id, "COMPLETED")
        assert output_of(record) == "quick" and record.attempts == 1, take_path
        assert record.worker_id == worker.worker_id and record.node_id == agent.settings.node_id
        assert record.started_at_ms is not None and record.completed_at_ms >= record.started_at_ms
        await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="message acked")
        await heard(writes, "COMPLETED")
        await async_wait_until(lambda: bool(events), what="the end announced")
        assert writes == ["IN_QUEUE", "COMPLETED"], (take_path, writes)
        assert [e.record.status for e in events] == ["COMPLETED"], take_path


async def test_progress_within_the_delay_writes_the_claim_at_once(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await submit(bus, ep, {"n": 2})
    writes = await stored_statuses(bus, ep, job_id)
    assert (await worker.take(http)).status_code == 200
    await worker.done(http, job_id, {"status": "IN_PROGRESS", "output": {"pct": 10}})
    record = await wait_record(bus, ep, job_id, "IN_PROGRESS", where=lambda r: r.output_json is not None,
                               timeout_s=10)
    assert record.attempts == 1 and output_of(record) == {"pct": 10}
    await worker.done(http, job_id, {"output": "done"})
    await wait_record(bus, ep, job_id, "COMPLETED")
    await heard(writes, "COMPLETED")
    assert writes == ["IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]  # claim, progress, end


async def test_a_chunk_within_the_delay_writes_the_claim_at_once(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await submit(bus, ep, {"n": 3})
    assert (await worker.take(http)).status_code == 200
    chunk = await http.post(worker.stream_url(job_id), content=json.dumps({"output": "a"}),
                            headers=worker.auth)
    assert chunk.status_code == 200
    record = await wait_record(bus, ep, job_id, "IN_PROGRESS", timeout_s=10)
    assert record.attempts == 1


async def test_a_cancel_within_the_delay_stops_the_job_and_nothing_overwrites_it(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await submit(bus, ep, {"n": 4})
    assert (await worker.take(http)).status_code == 200
    writes = await stored_statuses(bus, ep, job_id)
    await cancel_like_the_gateway(bus, ep, job_id)
    assert await async_wait_until(lambda: stops_offered(worker, http), timeout_s=10, what="a stop") == [job_id]
    assert (await worker.done(http, job_id, {"output": "late"})).status_code == 200
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="message acked")
    record = await record_of(bus, ep, job_id)
    assert record.status == "CANCELLED" and record.output_json is None and record.attempts == 0
    assert writes == ["CANCELLED"]


async def test_a_worker_lost_within_the_delay_has_its_attempt_counted(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await submit(bus, ep, {"n": 5})
    writes = await stored_statuses(bus, ep, job_id)
    assert (await worker.take(http)).status_code == 200
    os.kill(worker_pid(worker.worker_id), signal.SIGKILL)
    await wait_record(bus, ep, job_id, "IN_QUEUE", where=lambda r: r.attempts == 1, timeout_s=30)
    await async_wait_until(lambda: len(writes) >= 2, what="the claim and the requeue heard")
    assert writes[:2] == ["IN_PROGRESS", "IN_QUEUE"], writes  # claimed, then given back


async def test_a_job_still_running_after_the_delay_is_claimed(nats, bus, http):
    async with running_agent(nats.url, take_poll_s=1.0, as_sent_window_ms=60_000, claim_delay_ms=300) as agent:
        worker = await hand_worker(bus, agent)
        ep = worker.env["RUNPOD_ENDPOINT_ID"]
        job_id = await submit(bus, ep, {"n": 6})
        writes = await stored_statuses(bus, ep, job_id)
        events: list = []
        await collect_events(bus, job_id, events)
        assert (await worker.take(http)).status_code == 200
        record = await wait_record(bus, ep, job_id, "IN_PROGRESS", timeout_s=10)
        assert record.attempts == 1 and record.worker_id == worker.worker_id
        assert (await worker.done(http, job_id, {"output": "slow"})).status_code == 200
        await wait_record(bus, ep, job_id, "COMPLETED")
        await async_wait_until(lambda: len(events) == 2, what="both changes announced")
        await heard(writes, "COMPLETED")
        assert writes == ["IN_PROGRESS", "COMPLETED"]
        assert [e.record.status for e in events] == ["IN_PROGRESS", "COMPLETED"]
