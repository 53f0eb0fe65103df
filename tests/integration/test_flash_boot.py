"""Flash boot on one node agent with the process runtime: real RunPod-SDK workers (their forked
heartbeat process included), a real nats-server, real SIGSTOP/SIGCONT of process groups."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid

import pytest
from msgspec.structs import replace
from node_agent_harness import (
    ROOT,
    connected,
    output_of,
    process_alive,
    running_agent,
    start_worker,
    stop_worker,
    submit,
    wait_record,
    wait_worker_gone,
    wait_worker_state,
    worker_pid,
)
from runplane_node_agent.runtimes.process import group_members
from runplane_proto import subjects as s
from runplane_proto.endpoints import EndpointSpec
from runplane_testing.natsserver import env_with
from runplane_testing.waiting import async_wait_until

FLASH = ROOT / "examples" / "flash" / "handler.py"


def flash_spec(endpoint_id: str, **env: str) -> EndpointSpec:
    return EndpointSpec(id=endpoint_id, name=endpoint_id, command=[sys.executable, str(FLASH)], env=env,
                        flashboot=True)


def states(pgid: int) -> list[str]:
    """States of the group's processes but its leader (our shim, which is never stopped)."""
    return sorted(state for pid, state, _ in group_members(pgid) if pid != pgid)


def leader_state(pgid: int) -> str:
    return next(state for pid, state, _ in group_members(pgid) if pid == pgid)


async def _value(value):
    return value


async def test_an_idle_worker_is_paused_whole_group_and_a_job_wakes_it(nats):
    # A long take poll and a short ping timeout: the worker stays paused far longer than the
    # ping timeout, and must not be reaped as silent.
    async with connected(nats.url) as bus, running_agent(
            nats.url, flash_pause_s=0.2, take_poll_s=10.0, worker_ping_timeout_s=2.0) as agent:
        node = agent.settings.node_id
        worker_id = await start_worker(bus, node, flash_spec("flashidle"))
        worker = agent.supervisor.workers[worker_id]
        pgid = worker_pid(worker_id)
        # Group leader, the worker, the RunPod SDK's heartbeat process (and its helpers).
        await async_wait_until(lambda: _value(len(group_members(pgid)) >= 3), what="the heartbeat process")
        await async_wait_until(lambda: _value(worker.paused), what="the idle worker paused")
        await async_wait_until(lambda: _value(set(states(pgid)) == {"T"}), timeout_s=10,
                               what=f"every process of the group stopped: {states(pgid)}")
        assert leader_state(pgid) != "T"  # it must stay able to take the group down
        members = {pid for pid, _, _ in group_members(pgid)}
        # Silent (paused) for longer than the ping timeout, as its poll lasts 10 s: not recycled.
        await async_wait_until(lambda: _value(time.monotonic() - worker.last_seen > 3.0), timeout_s=9,
                               what="paused past the ping timeout")
        assert worker.paused and worker.generation == 1 and not worker.stopping
        assert worker_pid(worker_id) == pgid

        record = await wait_record(bus, "flashidle", await submit(bus, "flashidle", {"n": 1}), timeout_s=20)
        assert record.status == "COMPLETED" and record.worker_id == worker_id
        assert output_of(record)["input"] == {"n": 1} and output_of(record)["pid"] in members
        # The same processes, thawed, ran it; idle again, the worker is paused again.
        assert {pid for pid, _, _ in group_members(pgid)} == members
        await async_wait_until(lambda: _value(worker.paused), what="paused again")
        assert worker.generation == 1


async def test_a_paused_worker_is_stopped_cleanly(nats):
    async with connected(nats.url) as bus, running_agent(nats.url, flash_pause_s=0.0) as agent:
        node = agent.settings.node_id
        worker_id = await start_worker(bus, node, flash_spec("flashstop"))
        worker = agent.supervisor.workers[worker_id]
        await async_wait_until(lambda: _value(worker.paused), what="paused")
        pgid = worker_pid(worker_id)
        members = [pid for pid, _, _ in group_members(pgid)]
        assert (await stop_worker(bus, node, worker_id)).ok
        await wait_worker_gone(bus, node, worker_id)
        await async_wait_until(lambda: _value(not any(process_alive(p) for p in members)), timeout_s=15,
                               what="every process of the paused group gone")


async def test_a_parked_worker_keeps_its_id_wakes_for_a_job_and_resumes_on_start(nats):
    async with connected(nats.url) as bus, running_agent(
            nats.url, flash_pause_s=5.0, park_memory_mb=4096) as agent:
        node = agent.settings.node_id
        spec = flash_spec("flashpark")
        worker_id = await start_worker(bus, node, spec)
        worker = agent.supervisor.workers[worker_id]
        pid = worker_pid(worker_id)

        assert (await stop_worker(bus, node, worker_id, park=True)).ok
        info = await wait_worker_state(bus, node, worker_id, "parked")
        assert info.worker_id == worker_id
        await async_wait_until(lambda: _value(worker.paused), what="paused (at once, or at its next poll)")
        await async_wait_until(lambda: _value(set(states(pid)) == {"T"}), what="the parked worker stopped")
        assert (await stop_worker(bus, node, worker_id, park=True)).ok  # already parked: nothing to do

        # A job for its endpoint: the parked worker's own poll takes it, and it is live again.
        record = await wait_record(bus, "flashpark", await submit(bus, "flashpark", {"n": 2}), timeout_s=20)
        assert record.status == "COMPLETED" and record.worker_id == worker_id
        await wait_worker_state(bus, node, worker_id, "idle")
        assert worker_pid(worker_id) == pid and worker.generation == 1

        # Parked again, then a StartWorker naming it resumes it: same id, same process.
        assert (await stop_worker(bus, node, worker_id, park=True)).ok
        await wait_worker_state(bus, node, worker_id, "parked")
        assert await start_worker(bus, node, spec, worker_id=worker_id) == worker_id
        assert worker_pid(worker_id) == pid and not worker.parked

        # A StopWorker without `park` stops a parked worker for good.
        assert (await stop_worker(bus, node, worker_id, park=True)).ok
        await wait_worker_state(bus, node, worker_id, "parked")
        assert (await stop_worker(bus, node, worker_id)).ok
        await wait_worker_gone(bus, node, worker_id)
        assert not process_alive(pid)


async def test_a_changed_endpoint_resumes_a_parked_worker_as_a_fresh_process(nats):
    async with connected(nats.url) as bus, running_agent(nats.url, park_memory_mb=4096) as agent:
        node = agent.settings.node_id
        spec = flash_spec("flashchange")
        worker_id = await start_worker(bus, node, spec)
        pid = worker_pid(worker_id)
        assert (await stop_worker(bus, node, worker_id, park=True)).ok
        await wait_worker_state(bus, node, worker_id, "parked")
        changed = replace(spec, env={"INIT_S": "0.1"})
        assert await start_worker(bus, node, changed, worker_id=worker_id) == worker_id
        await async_wait_until(lambda: _value(worker_pid(worker_id) not in (None, pid)), timeout_s=30,
                               what="a fresh process")
        record = await wait_record(bus, "flashchange", await submit(bus, "flashchange", {}), timeout_s=30)
        assert output_of(record)["init_s"] >= 0.1


async def test_parking_within_the_memory_budget_evicts_the_least_recently_used(nats):
    # Each worker holds ~150 MB (plus the interpreter and the SDK): two fit in 500 MB, three do not.
    async with connected(nats.url) as bus, running_agent(
            nats.url, park_memory_mb=500, flash_pause_s=-1.0) as agent:
        node = agent.settings.node_id
        spec = flash_spec("flashlru", HOLD_MB="150")
        # Started one after the other and never used since: A is the least recently used.
        a, b, c = [await start_worker(bus, node, spec, worker_id=f"{n}-{uuid.uuid4().hex[:6]}") for n in "abc"]
        workers = agent.supervisor.workers
        assert workers[a].idle_since_ms < workers[b].idle_since_ms < workers[c].idle_since_ms
        pids = {w: worker_pid(w) for w in (a, b, c)}
        for worker_id in (b, a):  # parked in another order than they were used
            assert (await stop_worker(bus, node, worker_id, park=True)).ok
            await wait_worker_state(bus, node, worker_id, "parked")
        assert all(150 < workers[w].memory_mb < 250 for w in (a, b)), {w: workers[w].memory_mb for w in (a, b)}
        assert (await stop_worker(bus, node, c, park=True)).ok
        await wait_worker_state(bus, node, c, "parked")
        await wait_worker_gone(bus, node, a)
        await async_wait_until(lambda: _value(not process_alive(pids[a])), timeout_s=15, what="A evicted")
        await wait_worker_state(bus, node, b, "parked")
        assert workers[b].memory_mb + workers[c].memory_mb <= 500


async def test_a_worker_larger_than_the_budget_is_stopped_not_parked(nats):
    async with connected(nats.url) as bus, running_agent(nats.url, park_memory_mb=20) as agent:
        node = agent.settings.node_id
        worker_id = await start_worker(bus, node, flash_spec("flashbig", HOLD_MB="64"))
        assert (await stop_worker(bus, node, worker_id, park=True)).ok
        await wait_worker_gone(bus, node, worker_id)


@pytest.mark.parametrize("flashboot", [False])
async def test_a_worker_of_an_endpoint_without_flashboot_is_never_paused(nats, flashboot):
    async with connected(nats.url) as bus, running_agent(
            nats.url, flash_pause_s=0.0, park_memory_mb=4096) as agent:
        node = agent.settings.node_id
        spec = replace(flash_spec("noflash"), flashboot=flashboot)
        worker_id = await start_worker(bus, node, spec)
        pid = worker_pid(worker_id)
        record = await wait_record(bus, "noflash", await submit(bus, "noflash", {}), timeout_s=20)
        assert record.status == "COMPLETED"
        assert not agent.supervisor.workers[worker_id].paused and "T" not in states(pid)
        assert (await stop_worker(bus, node, worker_id, park=True)).ok
        await wait_worker_gone(bus, node, worker_id)


async def test_a_paused_group_dies_with_a_sigkilled_agent(nats):
    agent = subprocess.Popen(
        [sys.executable, "-m", "runplane_node_agent"],
        env=env_with(RP_NATS_URL=nats.url, RP_NODE_ID="doomedflash", RP_AGENT_PORT="0", RP_FLASH_PAUSE_S="0",
                     RP_LOG_LEVEL="WARNING"))
    try:
        async with connected(nats.url) as bus:
            await async_wait_until(lambda: bus.nodes.get(s.node_key("doomedflash")), timeout_s=30,
                                   what="the agent up")
            worker_id = await start_worker(bus, "doomedflash", flash_spec("flashdoomed"))
            pgid = worker_pid(worker_id)
            await async_wait_until(lambda: _value(len(states(pgid)) >= 2 and set(states(pgid)) == {"T"}),
                                   timeout_s=15, what="the worker paused")
            members = [pid for pid, _, _ in group_members(pgid)]
            agent.kill()
            agent.wait()
            await async_wait_until(lambda: _value(not any(process_alive(p) for p in members)), timeout_s=15,
                                   what="no process of the paused group left")
    finally:
        with contextlib.suppress(ProcessLookupError):
            agent.kill()
        agent.wait()
