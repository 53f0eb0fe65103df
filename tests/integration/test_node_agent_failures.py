"""What happens to jobs when workers or agents die, stall, or run out of attempts or time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

from node_agent_harness import (
    connected,
    echo_spec,
    fast_spec,
    process_alive,
    record_of,
    running_agent,
    start_worker,
    submit,
    wait_record,
    wait_worker_state,
    worker_pid,
)
from runplane_proto import subjects as s
from runplane_proto.jobs import JobPolicy, JobQueued, JobRecord
from runplane_testing.natsserver import env_with
from runplane_testing.waiting import async_wait_until


async def _value(value):
    return value


async def test_exhausted_attempts_fail_with_the_exit_code(nats_server):
    async with connected(nats_server.url) as bus, running_agent(nats_server.url, max_attempts=1) as agent:
        ep = "exhaust"
        worker_id = await start_worker(bus, agent.settings.node_id, echo_spec(ep))
        job_id = await submit(bus, ep, {"sleep": 30})
        await wait_record(bus, ep, job_id, "IN_PROGRESS")
        os.kill(worker_pid(worker_id), signal.SIGKILL)
        record = await wait_record(bus, ep, job_id, timeout_s=10)
        assert record.status == "FAILED" and record.attempts == 1
        assert record.error == "worker exited with code -9; attempt 1 of 1"


async def test_taking_checks_attempts_and_ttl(nats_server):
    async with connected(nats_server.url) as bus, running_agent(nats_server.url) as agent:
        ep = "checks"
        now_ms = int(time.time() * 1000)
        expired = await submit(bus, ep, {"x": 1}, ttl_ms=10_000, submitted_at_ms=now_ms - 20_000)
        # A job three agents already died with: redelivered once more, never run again.
        worn = "worn-r1"
        record = JobRecord(id=worn, endpoint_id=ep, status="IN_PROGRESS", submitted_at_ms=now_ms, attempts=3,
                           policy=JobPolicy(execution_timeout_ms=60_000, ttl_ms=600_000), input_json=b"{}")
        await bus.jobs.create(s.job_key(ep, worn), record)
        await bus.publish_durable(s.job_queue(ep),
                                  JobQueued(job_id=worn, endpoint_id=ep, submitted_at_ms=now_ms))
        fine = await submit(bus, ep, {"x": 2})
        await start_worker(bus, agent.settings.node_id, fast_spec(ep))
        timed_out = await wait_record(bus, ep, expired)
        assert timed_out.status == "TIMED_OUT" and "ttl of 10000 ms" in timed_out.error
        failed = await wait_record(bus, ep, worn)
        assert failed.status == "FAILED" and failed.error.startswith("attempts exhausted")
        assert (await wait_record(bus, ep, fine)).status == "COMPLETED"


async def test_job_of_a_sigkilled_agent_is_redelivered_to_another_agent(nats_server):
    url = nats_server.url
    first = subprocess.Popen(
        [sys.executable, "-m", "runplane_node_agent"],
        env=env_with(RP_NATS_URL=url, RP_NODE_ID="doomed", RP_AGENT_PORT="0", RP_ACK_WAIT_S="2",
                     RP_LOG_LEVEL="WARNING"),
    )
    try:
        async with connected(url) as bus:
            async def status():
                return await bus.nodes.get(s.node_key("doomed"))
            await async_wait_until(status, timeout_s=30, what="first agent up")
            ep = "survive"
            doomed_worker = await start_worker(bus, "doomed", fast_spec(ep))
            pid = worker_pid(doomed_worker)
            job_id = await submit(bus, ep, {"sleep": 2})
            await wait_record(bus, ep, job_id, "IN_PROGRESS", where=lambda r: r.node_id == "doomed")
            first.kill()
            first.wait()
            # Its workers die with it (PR_SET_PDEATHSIG)...
            await async_wait_until(lambda: _value(worker_pid(doomed_worker) is None), what="worker gone")
            # (its environment vanishes a moment before the exiting process does)
            await async_wait_until(lambda: _value(not process_alive(pid)), timeout_s=10, what="worker exited")
            # ... and after ack_wait JetStream hands the job to another agent.
            async with running_agent(url, ack_wait_s=2) as second:
                await start_worker(bus, second.settings.node_id, fast_spec(ep))
                record = await wait_record(bus, ep, job_id, "COMPLETED", timeout_s=30)
                assert record.attempts == 2 and record.node_id == second.settings.node_id
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
        first.wait()


async def test_silent_worker_is_recycled_and_its_job_requeued(nats_server):
    async with connected(nats_server.url) as bus, \
            running_agent(nats_server.url, worker_ping_timeout_s=2.5, stop_grace_s=1.0) as agent:
        ep = "silent"
        worker_id = await start_worker(bus, agent.settings.node_id, fast_spec(ep))
        await async_wait_until(lambda: _value(agent.supervisor.workers[worker_id].pinged), what="first ping")
        job_id = await submit(bus, ep, {"sleep": 1})
        await wait_record(bus, ep, job_id, "IN_PROGRESS")
        frozen = worker_pid(worker_id)
        os.killpg(frozen, signal.SIGSTOP)  # alive but silent
        record = await wait_record(bus, ep, job_id, "COMPLETED", timeout_s=30)
        assert record.attempts == 2 and record.worker_id == worker_id  # the fresh process under the same id
        assert worker_pid(worker_id) != frozen


async def test_sync_handler_that_cannot_stop_is_recycled_after_the_grace(nats_server):
    async with connected(nats_server.url) as bus, running_agent(nats_server.url, stop_grace_s=1.0) as agent:
        ep = "stubborn"
        worker_id = await start_worker(bus, agent.settings.node_id, fast_spec(ep))
        old_pid = worker_pid(worker_id)
        job_id = await submit(bus, ep, {"sleep": 60}, execution_timeout_ms=1000)
        record = await wait_record(bus, ep, job_id, timeout_s=20)
        assert record.status == "TIMED_OUT" and record.error == "execution timeout of 1000 ms exceeded"

        async def replaced():
            pid = worker_pid(worker_id)
            return pid is not None and pid != old_pid
        await async_wait_until(replaced, timeout_s=20, what="recycled worker")
        await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle")
        assert (await record_of(bus, ep, job_id)).status == "TIMED_OUT"
        assert (await wait_record(bus, ep, await submit(bus, ep, {"x": 1}))).status == "COMPLETED"


async def test_shutdown_finishes_short_jobs_and_gives_long_ones_back(nats_server):
    async with connected(nats_server.url) as bus:
        async with running_agent(nats_server.url, shutdown_grace_s=1.5) as agent:
            node = agent.settings.node_id
            await start_worker(bus, node, fast_spec("short"))
            await start_worker(bus, node, fast_spec("long"))
            short = await submit(bus, "short", {"sleep": 0.5})
            long = await submit(bus, "long", {"sleep": 30})
            await wait_record(bus, "short", short, "IN_PROGRESS")
            await wait_record(bus, "long", long, "IN_PROGRESS")
        assert (await record_of(bus, "short", short)).status == "COMPLETED"
        given_back = await record_of(bus, "long", long)
        assert given_back.status == "IN_QUEUE" and given_back.attempts == 0 and given_back.worker_id is None
        assert await bus.nodes.get(s.node_key(node)) is None
        async with running_agent(nats_server.url) as again:
            await start_worker(bus, again.settings.node_id, fast_spec("long"), ready=False)
            # Redelivered at once (nak), not after ack_wait (3 s here): it was given back.
            started = time.monotonic()
            record = await wait_record(bus, "long", long, "IN_PROGRESS", timeout_s=15)
            assert time.monotonic() - started < 2.5
            assert record.attempts == 1


async def test_sigterm_stops_workers_and_removes_the_node(nats_server):
    url = nats_server.url
    agent = subprocess.Popen(
        [sys.executable, "-m", "runplane_node_agent"],
        env=env_with(RP_NATS_URL=url, RP_NODE_ID="leaving", RP_AGENT_PORT="0", RP_LOG_LEVEL="WARNING"),
    )
    try:
        async with connected(url) as bus:
            async def status():
                return await bus.nodes.get(s.node_key("leaving"))
            await async_wait_until(status, timeout_s=30, what="agent up")
            worker_id = await start_worker(bus, "leaving", fast_spec("bye"))
            pid = worker_pid(worker_id)
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(agent.wait, 20) == 0
            assert not process_alive(pid)
            assert await bus.nodes.get(s.node_key("leaving")) is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            agent.kill()
        agent.wait()


async def test_a_message_ahead_of_its_record_waits_for_it(nats_server):
    """The gateway writes the record and queues the job at once: the message may come first."""
    async with connected(nats_server.url) as bus, running_agent(nats_server.url) as agent:
        ep = "racy"
        await start_worker(bus, agent.settings.node_id, fast_spec(ep))
        now_ms = int(time.time() * 1000)
        record = JobRecord(id="early-r1", endpoint_id=ep, status="IN_QUEUE", submitted_at_ms=now_ms,
                           policy=JobPolicy(execution_timeout_ms=60_000, ttl_ms=600_000), input_json=b'"x"')
        await bus.publish_durable(s.job_queue(ep), JobQueued(job_id="early-r1", endpoint_id=ep,
                                                             submitted_at_ms=now_ms))

        async def seen_and_put_back():
            info = await bus.js.consumer_info(s.STREAM_JOBS, s.job_consumer(ep))
            return info.num_redelivered >= 1 or info.num_ack_pending == 1
        await async_wait_until(seen_and_put_back, what="message delivered before its record")
        await bus.jobs.create(s.job_key(ep, "early-r1"), record)
        assert (await wait_record(bus, ep, "early-r1")).status == "COMPLETED"
        # A message whose record never shows up is dropped once it is old.
        await bus.publish_durable(s.job_queue(ep), JobQueued(job_id="orphan-r1", endpoint_id=ep,
                                                             submitted_at_ms=now_ms - 60_000))

        async def dropped():
            info = await bus.js.consumer_info(s.STREAM_JOBS, s.job_consumer(ep))
            return info.num_pending == 0 and info.num_ack_pending == 0
        await async_wait_until(dropped, what="orphan message dropped")
