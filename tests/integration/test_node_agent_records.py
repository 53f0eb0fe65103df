"""A job record write waits out a NATS outage of a few seconds (a JetStream cluster electing a
bucket leader after a server died, here a restarted server) instead of failing at once: a
failed claim meant an execution no attempt counted, a failed result meant the job ran again.
A write that landed while its answer was lost (nats-py sends what it buffered once it has
reconnected) is recognised as done rather than read as a conflict."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from runplane_bus import Bus, BusSettings
from runplane_bus.topology import ensure_topology
from runplane_node_agent.records import RecordWriter
from runplane_proto import subjects as s
from runplane_proto.jobs import JobPolicy, JobRecord, StreamChunk
from runplane_testing.natsserver import NatsServer


def _record() -> JobRecord:
    return JobRecord(id="job-1", endpoint_id="ep", status="IN_QUEUE", submitted_at_ms=1,
                     policy=JobPolicy(execution_timeout_ms=60_000, ttl_ms=600_000), input_json=b"{}")


async def _outage(tmp_path, retry_s: float):
    """(outcome of the write made while the server was down, the record afterwards)"""
    server = NatsServer(store_dir=str(tmp_path / "store")).start()
    bus = await Bus.connect(BusSettings(url=server.url, request_timeout_s=1.0))
    try:
        key = s.job_key("ep", "job-1")
        revision = await bus.jobs.create(key, _record())
        server.stop()
        write = asyncio.create_task(RecordWriter(bus, retry_s=retry_s).update(
            key, msgspec.structs.replace(_record(), status="IN_PROGRESS", attempts=1), revision))
        await asyncio.wait([write], timeout=2.0)  # the outage lasts at least this long
        server = NatsServer(port=server.port, store_dir=str(tmp_path / "store")).start()
        outcome = await asyncio.gather(write, return_exceptions=True)
        got = None
        for _ in range(100):
            try:
                got = await bus.jobs.get(key)
                break
            except Exception:  # still reconnecting
                await asyncio.sleep(0.1)
        return outcome[0], got
    finally:
        await bus.close()
        server.stop()


async def test_a_record_write_waits_out_a_restarted_server(tmp_path):
    outcome, got = await _outage(tmp_path, retry_s=30.0)
    assert isinstance(outcome, int), outcome
    assert got is not None and got.value.status == "IN_PROGRESS" and got.value.attempts == 1
    assert got.revision == outcome


async def test_without_retries_the_same_write_fails(tmp_path):
    outcome, got = await _outage(tmp_path, retry_s=0.0)
    assert isinstance(outcome, Exception) and not isinstance(outcome, pytest.fail.Exception)
    assert got is not None and got.value.status == "IN_QUEUE"


async def test_a_webhook_due_waits_for_its_stream(nats_server):
    """The job's end is written, then its webhook is queued: the webhook stream being unavailable
    in between (here deleted, then made again) must not drop it, since a terminal record is
    never concluded again."""
    bus = await Bus.connect(BusSettings(url=nats_server.url, request_timeout_s=1.0))
    try:
        key = s.job_key("ep", "job-1")
        running = msgspec.structs.replace(_record(), status="IN_PROGRESS", attempts=1,
                                          webhook="http://127.0.0.1:9/hook")
        revision = await bus.jobs.create(key, running)
        done = msgspec.structs.replace(running, status="COMPLETED", output_json=b"{}", completed_at_ms=2)
        await bus.js.delete_stream(s.STREAM_WEBHOOKS)
        conclude = asyncio.create_task(RecordWriter(bus, retry_s=30.0).conclude(
            key, running, revision, lambda r: done))
        await asyncio.wait([conclude], timeout=1.0)
        assert not conclude.done() or conclude.exception() is None
        assert (await bus.jobs.get(key)).value == done  # the end is written already
        await ensure_topology(bus.js)
        assert await asyncio.wait_for(conclude, 30) == done
        assert (await bus.js.stream_info(s.STREAM_WEBHOOKS)).state.messages == 1
    finally:
        await bus.close()


async def test_a_stream_chunk_waits_for_its_stream_and_is_stored_once(nats_server):
    """A job's stream chunk published while its stream is unavailable is stored once it is back
    (RunPod's SDK drops a chunk answered with 500); sent again with the same id, it is not
    stored twice."""
    bus = await Bus.connect(BusSettings(url=nats_server.url, request_timeout_s=1.0))
    try:
        writer = RecordWriter(bus, retry_s=30.0)
        chunk = StreamChunk(job_id="job-1", index=0, chunk_json=b'{"output": 1}')
        await bus.js.delete_stream(s.STREAM_CHUNKS)
        publish = asyncio.create_task(writer.publish_durable(s.job_chunks("job-1"), chunk,
                                                             msg_id="job-1:1:0", job_id="job-1"))
        await asyncio.wait([publish], timeout=1.0)
        assert not publish.done() or publish.exception() is None
        await ensure_topology(bus.js)
        await asyncio.wait_for(publish, 30)
        await writer.publish_durable(s.job_chunks("job-1"), chunk, msg_id="job-1:1:0", job_id="job-1")
        assert (await bus.js.stream_info(s.STREAM_CHUNKS)).state.messages == 1
    finally:
        await bus.close()
