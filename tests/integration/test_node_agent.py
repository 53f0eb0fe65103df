"""The node agent with real `runpod.serverless.start` workers (examples/echo) and a real nats-server.

Jobs are published the way the gateway does; assertions are on the job records.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import pytest_asyncio
from node_agent_harness import (
    echo_spec,
    output_of,
    process_alive,
    record_of,
    start_worker,
    stop_worker,
    submit,
    wait_record,
    wait_worker_gone,
    wait_worker_state,
    worker_pid,
)
from runplane_node_agent import metrics
from runplane_proto import subjects as s
from runplane_testing.waiting import async_wait_until
from test_node_agent_worker_api import cancel_like_the_gateway, collect_events, consumer_settled, read_chunks

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo(bus, agent):
    """One echo worker shared by the tests that leave it healthy."""
    worker_id = await start_worker(bus, agent.settings.node_id, echo_spec("echo"))
    return "echo", worker_id


async def _value(value):
    return value


async def test_runpod_worker_completes_a_job(bus, agent, echo):
    ep, worker_id = echo
    job_id = await submit(bus, ep, {"text": "hello"})
    record = await wait_record(bus, ep, job_id)
    assert record.status == "COMPLETED", record.error
    assert output_of(record) == {"echo": {"text": "hello"}, "upper": "HELLO"}
    assert record.worker_id == worker_id and record.node_id == agent.settings.node_id
    assert record.attempts == 1 and record.error is None
    assert record.submitted_at_ms <= record.started_at_ms <= record.completed_at_ms
    status = (await bus.nodes.get(s.node_key(agent.settings.node_id))).value
    assert status.runtime == "process" and "pause" in status.capabilities and status.cpu_count >= 1
    assert status.gpus == [] and "gpu" not in status.capabilities
    import shutil
    disk = shutil.disk_usage("/")
    assert status.disk_total_mb == disk.total // 2**20 and 0 < status.disk_free_mb <= status.disk_total_mb
    assert 0 < status.memory_available_mb <= status.memory_total_mb
    info = await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle",
                                   where=lambda i: i.idle_since_ms >= record.completed_at_ms)
    assert info.endpoint_id == ep and info.jobs == []
    await async_wait_until(lambda: _value(agent.supervisor.workers[worker_id].runpod_version == "1.12.0"),
                           what="ping with the SDK version")


async def test_raising_handler_fails_with_the_sdk_error_string(bus, echo):
    ep, worker_id = echo
    job_id = await submit(bus, ep, {"fail": "boom"})
    record = await wait_record(bus, ep, job_id)
    assert record.status == "FAILED"
    error = json.loads(record.error)
    assert error["error_type"] == "<class 'RuntimeError'>" and error["error_message"] == "boom"
    assert error["worker_id"] == worker_id and error["runpod_version"] == "1.12.0"
    assert "Traceback" in error["error_traceback"]


async def test_progress_update_is_visible_while_the_job_runs(bus, echo):
    ep, _ = echo
    job_id = await submit(bus, ep, {"sleep": 2, "text": "p"})
    record = await wait_record(bus, ep, job_id, "IN_PROGRESS", where=lambda r: r.output_json is not None)
    assert output_of(record) == {"sleeping_s": 2}
    record = await wait_record(bus, ep, job_id)
    assert record.status == "COMPLETED"
    assert output_of(record) == {"echo": {"sleep": 2, "text": "p"}, "upper": "P"}


@pytest.mark.parametrize("aggregate", [True, False])
async def test_generator_chunks_are_stored_in_order(bus, agent, aggregate):
    ep = f"stream{'agg' if aggregate else 'noagg'}"
    await start_worker(bus, agent.settings.node_id,
                       echo_spec(ep, ECHO_MODE="stream", ECHO_AGGREGATE=str(aggregate).lower()))
    job_id = "streamjob-" + ep
    events: list = []
    await collect_events(bus, job_id, events)
    await submit(bus, ep, {"stream": 3, "text": "ab"}, job_id=job_id)
    record = await wait_record(bus, ep, job_id)
    assert record.status == "COMPLETED", record.error
    chunks = [{"index": i, "text": "AB"} for i in range(3)]
    assert output_of(record) == (chunks if aggregate else [])
    assert record.chunks == 3
    stored = await read_chunks(bus, job_id, 3)
    assert [json.loads(c.chunk_json) for c in stored] == [{"output": c} for c in chunks]
    assert [e.index for e in events if type(e).__name__ == "ChunkAdded"] == [0, 1, 2]


async def test_refresh_worker_recycles_the_worker(bus, agent):
    ep = "refresh"
    worker_id = await start_worker(bus, agent.settings.node_id, echo_spec(ep))
    old_pid = worker_pid(worker_id)
    job_id = await submit(bus, ep, {"text": "x", "refresh": True})
    record = await wait_record(bus, ep, job_id)
    assert record.status == "COMPLETED" and output_of(record) == {"echo": {"text": "x", "refresh": True},
                                                                  "upper": "X"}

    async def replaced():
        pid = worker_pid(worker_id)
        return pid is not None and pid != old_pid and old_pid is not None and not process_alive(old_pid)
    await async_wait_until(replaced, timeout_s=30, what="fresh worker process")
    await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle", timeout_s=60)
    second = await wait_record(bus, ep, await submit(bus, ep, {"text": "y"}))
    assert second.status == "COMPLETED" and second.worker_id == worker_id


async def test_cancel_reaches_the_handler_and_the_job_stays_cancelled(bus, agent):
    ep = "cancel"
    worker_id = await start_worker(bus, agent.settings.node_id, echo_spec(ep))
    pid = worker_pid(worker_id)
    job_id = await submit(bus, ep, {"sleep": 60})
    await wait_record(bus, ep, job_id, "IN_PROGRESS")
    await cancel_like_the_gateway(bus, ep, job_id)
    # The async handler is cancelled through job-stop; the worker lets go, the message is acked.
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="message acked")
    await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle")
    assert worker_pid(worker_id) == pid, "a worker that let go in time is not recycled"
    record = await record_of(bus, ep, job_id)
    assert record.status == "CANCELLED"
    after = await wait_record(bus, ep, await submit(bus, ep, {"text": "next"}))
    assert after.status == "COMPLETED"
    assert (await record_of(bus, ep, job_id)).status == "CANCELLED"


async def test_execution_timeout_times_out_and_stops_the_handler(bus, agent):
    ep = "timeout"
    worker_id = await start_worker(bus, agent.settings.node_id, echo_spec(ep))
    job_id = await submit(bus, ep, {"sleep": 60}, execution_timeout_ms=1500)
    record = await wait_record(bus, ep, job_id, timeout_s=20)
    assert record.status == "TIMED_OUT"
    assert record.error == "execution timeout of 1500 ms exceeded"
    assert output_of(record) == {"sleeping_s": 60}  # the last progress is kept
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="message acked")
    await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle")
    assert (await record_of(bus, ep, job_id)).status == "TIMED_OUT"


async def test_worker_killed_mid_job_gets_its_job_redelivered(bus, agent):
    ep = "killed"
    victim = await start_worker(bus, agent.settings.node_id, echo_spec(ep))
    job_id = await submit(bus, ep, {"sleep": 2, "text": "again"})
    await wait_record(bus, ep, job_id, "IN_PROGRESS", where=lambda r: r.worker_id == victim)
    os.kill(worker_pid(victim), signal.SIGKILL)
    # Its exit is noticed at once: the record goes back to the queue...
    await wait_record(bus, ep, job_id, "IN_QUEUE", timeout_s=10)
    assert await async_wait_until(lambda: _value(worker_pid(victim) is None), what="process group gone")
    await wait_worker_gone(bus, agent.settings.node_id, victim)
    # ... and the next worker of the endpoint runs it.
    rescuer = await start_worker(bus, agent.settings.node_id, echo_spec(ep))
    record = await wait_record(bus, ep, job_id, timeout_s=30)
    assert record.status == "COMPLETED" and record.attempts == 2 and record.worker_id == rescuer


async def test_stop_worker_leaves_a_busy_worker_alone(bus, agent):
    ep = "stopping"
    node = agent.settings.node_id
    worker_id = await start_worker(bus, node, echo_spec(ep))
    assert await start_worker(bus, node, echo_spec(ep), worker_id=worker_id, ready=False) == worker_id
    assert len([w for w in agent.supervisor.workers if w == worker_id]) == 1
    job_id = await submit(bus, ep, {"sleep": 1.5})
    await wait_record(bus, ep, job_id, "IN_PROGRESS")
    busy = await stop_worker(bus, node, worker_id)
    assert not busy.ok and busy.error == "worker is busy"
    done = await wait_record(bus, ep, job_id, "COMPLETED")
    await wait_worker_state(bus, node, worker_id, "idle",
                            where=lambda info: info.idle_since_ms >= done.completed_at_ms)
    pid = worker_pid(worker_id)
    assert (await stop_worker(bus, node, worker_id)).ok
    await async_wait_until(lambda: _value(not process_alive(pid)), timeout_s=15, what="worker process exit")
    await wait_worker_gone(bus, node, worker_id)


async def test_the_layout_version_moves_with_the_workers_and_not_with_heartbeats(bus, agent, echo):
    _, worker_id = echo
    key = s.node_key(agent.settings.node_id)
    await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle")
    before = (await bus.nodes.get(key)).value
    await async_wait_until(lambda: _beat_after(bus, key, before.heartbeat_at_ms), what="a later heartbeat")
    beat = (await bus.nodes.get(key)).value
    assert before.layout_version >= 1 and (beat.workers == before.workers) == (
        beat.layout_version == before.layout_version)
    other = await start_worker(bus, agent.settings.node_id, echo_spec("layout"))
    changed = (await bus.nodes.get(key)).value
    assert any(w.worker_id == other for w in changed.workers) and changed.layout_version > beat.layout_version
    await stop_worker(bus, agent.settings.node_id, other)
    await wait_worker_gone(bus, agent.settings.node_id, other)


async def _beat_after(bus, key: str, heartbeat_at_ms: int) -> bool:
    return (await bus.nodes.get(key)).value.heartbeat_at_ms > heartbeat_at_ms


async def test_a_job_cancelled_while_it_waited_in_the_queue_never_starts(bus, agent):
    """Its queue message still carries the record as submitted (IN_QUEUE); the job waited
    longer than the as-sent window, so the agent reads the stored record first, finds it
    CANCELLED and acks the message: no worker is handed the job."""
    ep = "waited"
    job_id = await submit(bus, ep, {"text": "never"}, submitted_at_ms=int(time.time() * 1000) - 10_000)
    await cancel_like_the_gateway(bus, ep, job_id)
    skipped = metrics.JOBS_SKIPPED.labels(endpoint=ep, reason="terminal")
    before = skipped._value.get()
    worker_id = await start_worker(bus, agent.settings.node_id, echo_spec(ep))
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="message acked")
    assert skipped._value.get() == before + 1
    record = await record_of(bus, ep, job_id)
    assert record.status == "CANCELLED" and record.worker_id is None and record.attempts == 0
    info = await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle")
    assert info.worker_id == worker_id
