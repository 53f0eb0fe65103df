"""The gateway's fleet views (/v1/nodes, an endpoint's workers, recent jobs, worker logs)
against a real nats-server: node status written to KV as agents write it, job records as the
gateway and agents write them, and worker logs answered by the node agent's real WorkerLogs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from runplane_bus import Bus, BusSettings
from runplane_gateway.app import Gateway
from runplane_gateway.settings import GatewaySettings
from runplane_node_agent.worker_logs import WorkerLogs
from runplane_proto import subjects
from runplane_proto.jobs import JobPolicy, JobRecord
from runplane_proto.nodes import GpuInfo, NodeStatus, WorkerInfo
from runplane_service.clock import FakeClock

KEY = "fleet-key"
SETTINGS = GatewaySettings(api_key=KEY, node_loss_timeout_s=10, result_retention_s=600)


class Stack:
    def __init__(self, bus: Bus, http: httpx.AsyncClient, clock: FakeClock) -> None:
        self.bus, self.http, self.clock = bus, http, clock

    async def endpoint(self, name: str) -> str:
        resp = await self.http.post("/v1/endpoints", json={"name": name, "command": ["true"]})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]


@pytest.fixture
async def stack(nats_server) -> AsyncIterator[Stack]:
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    clock = FakeClock()
    gateway = await Gateway.start(bus, SETTINGS, clock=clock, webhooks=False)
    transport = httpx.ASGITransport(app=gateway.app)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers, timeout=30) as http:
        yield Stack(bus, http, clock)
    await gateway.stop()
    await bus.close()


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{index}", name=name, memory_total_mb=81559, memory_used_mb=1000 * index,
                   utilization_pct=10 * index)


async def test_nodes_show_gpus_free_and_held_and_lost_nodes(stack: Stack) -> None:
    ep = await stack.endpoint("fleet")
    now = stack.clock.now_ms()
    workers = [
        WorkerInfo(worker_id="w-run", endpoint_id=ep, state="running", started_at_ms=now - 5000, jobs=["j1"],
                   gpu_uuids=["GPU-0", "GPU-1"]),
        WorkerInfo(worker_id="w-park", endpoint_id=ep, state="parked", started_at_ms=now - 9000,
                   gpu_uuids=["GPU-2"]),
        WorkerInfo(worker_id="w-new", endpoint_id=ep, state="starting", started_at_ms=now),
    ]
    await stack.bus.nodes.put(subjects.node_key("gpu-a"), NodeStatus(
        node_id="gpu-a", hostname="a", runtime="docker", gpus=[gpu(i) for i in range(4)], workers=workers,
        heartbeat_at_ms=now, cpu_count=64))
    await stack.bus.nodes.put(subjects.node_key("old"), NodeStatus(
        node_id="old", hostname="b", runtime="process", heartbeat_at_ms=now - 60_000,
        workers=[WorkerInfo(worker_id="w-lost", endpoint_id=ep, state="idle", started_at_ms=now - 90_000)]))

    nodes = (await stack.http.get("/v1/nodes")).json()
    assert [n["id"] for n in nodes] == ["gpu-a", "old"]
    a, old = nodes
    assert (a["lost"], old["lost"]) == (False, True)
    assert (a["gpusUsed"], a["gpusFree"]) == (3, 1)
    assert [(g["index"], g["workerId"], g["endpointId"]) for g in a["gpus"]] == [
        (0, "w-run", ep), (1, "w-run", ep), (2, "w-park", ep), (3, None, None)]
    assert a["gpus"][3]["utilizationPct"] == 30 and a["gpus"][3]["memoryUsedMb"] == 3000

    listed = (await stack.http.get(f"/v1/endpoints/{ep}/workers")).json()
    # Lost nodes' workers are left out; the bus's "starting" is RunPod's "initializing".
    assert [(w["id"], w["state"], w["nodeId"]) for w in listed] == [
        ("w-park", "parked", "gpu-a"), ("w-run", "running", "gpu-a"), ("w-new", "initializing", "gpu-a")]
    assert listed[1]["gpuNames"] == ["NVIDIA H100 80GB HBM3"] * 2 and listed[1]["jobs"] == ["j1"]
    assert (await stack.http.get("/v1/endpoints/nope/workers")).status_code == 404


async def test_recent_jobs_newest_first_with_timings(stack: Stack) -> None:
    ep = await stack.endpoint("jobs")
    now = stack.clock.now_ms()
    policy = JobPolicy(execution_timeout_ms=600_000, ttl_ms=60_000)
    records = [
        JobRecord(id="j-done", endpoint_id=ep, status="COMPLETED", policy=policy, submitted_at_ms=now - 3000,
                  started_at_ms=now - 2500, completed_at_ms=now - 1000, worker_id="w1", node_id="n1", attempts=1),
        JobRecord(id="j-run", endpoint_id=ep, status="IN_PROGRESS", policy=policy, submitted_at_ms=now - 2000,
                  started_at_ms=now - 1500, worker_id="w1", node_id="n1", attempts=1),
        JobRecord(id="j-queued", endpoint_id=ep, status="IN_QUEUE", policy=policy, submitted_at_ms=now - 1000),
        JobRecord(id="j-expired", endpoint_id=ep, status="IN_QUEUE", policy=policy, submitted_at_ms=now - 90_000),
        JobRecord(id="j-gone", endpoint_id=ep, status="FAILED", policy=policy, submitted_at_ms=now - 900_000,
                  completed_at_ms=now - 800_000, error="old"),
    ]
    for record in records:
        await stack.bus.jobs.put(subjects.job_key(ep, record.id), record)
    jobs = (await stack.http.get(f"/v1/endpoints/{ep}/jobs")).json()
    assert [j["id"] for j in jobs] == ["j-queued", "j-run", "j-done", "j-expired"]  # j-gone: past retention
    done = jobs[2]
    assert (done["delayTime"], done["executionTime"], done["workerId"], done["nodeId"]) == (500, 1500, "w1", "n1")
    assert jobs[1]["executionTime"] == 1500 and "completedAtMs" not in jobs[1]
    assert jobs[3]["status"] == "TIMED_OUT"  # as a client would see it, past its TTL
    assert [j["id"] for j in (await stack.http.get(f"/v1/endpoints/{ep}/jobs?limit=2")).json()] == [
        "j-queued", "j-run"]
    only = (await stack.http.get(f"/v1/endpoints/{ep}/jobs?status=completed")).json()
    assert [j["id"] for j in only] == ["j-done"]
    bad = await stack.http.get(f"/v1/endpoints/{ep}/jobs?limit=-1")
    assert bad.status_code == 400 and "limit" in bad.json()["error"]


async def test_worker_logs_merged_from_agents_and_followed_by_cursor(stack: Stack) -> None:
    ep = await stack.endpoint("logs")
    other = await stack.endpoint("other")
    now = stack.clock.now_ms()
    agents = {}
    for node_id in ("n1", "n2"):
        agents[node_id] = WorkerLogs(node_id, stack.clock)
        await agents[node_id].serve(stack.bus)
        await stack.bus.nodes.put(subjects.node_key(node_id), NodeStatus(
            node_id=node_id, hostname=node_id, runtime="process", heartbeat_at_ms=now))
    # A live node whose agent does not answer (an older agent, or one that is stuck).
    await stack.bus.nodes.put(subjects.node_key("mute"), NodeStatus(
        node_id="mute", hostname="m", runtime="process", heartbeat_at_ms=now))
    agents["n1"].record("w1", ep, "stdout", "first", None)
    stack.clock.advance(0.001)
    agents["n2"].record("w2", ep, "stderr", "second", "job-1")
    agents["n2"].record("w9", other, "stdout", "not this endpoint", None)
    stack.clock.advance(0.001)
    agents["n1"].record("w1", ep, "stdout", "third", None)

    got = (await stack.http.get(f"/v1/endpoints/{ep}/logs")).json()
    assert [(x["nodeId"], x["workerId"], x["stream"], x["line"]) for x in got["lines"]] == [
        ("n1", "w1", "stdout", "first"), ("n2", "w2", "stderr", "second"), ("n1", "w1", "stdout", "third")]
    assert got["lines"][1]["jobId"] == "job-1" and got["unreachable"] == ["mute"]

    agents["n2"].record("w2", ep, "stdout", "fourth", None)
    newer = (await stack.http.get(f"/v1/endpoints/{ep}/logs", params={"after": got["cursor"]})).json()
    assert [x["line"] for x in newer["lines"]] == ["fourth"]
    again = (await stack.http.get(f"/v1/endpoints/{ep}/logs", params={"after": newer["cursor"]})).json()
    assert again["lines"] == []

    one = (await stack.http.get(f"/v1/endpoints/{ep}/logs", params={"worker": "w2", "limit": 1})).json()
    assert [x["line"] for x in one["lines"]] == ["fourth"]
    assert (await stack.http.get(f"/v1/endpoints/{ep}/logs", params={"after": "garbage!"})).status_code == 400


def test_worker_logs_keep_bounded_lines_and_restart_their_sequence():
    from runplane_node_agent import worker_logs
    from runplane_proto.logs import WorkerLogsRequest

    logs = WorkerLogs("n", FakeClock())
    for i in range(worker_logs.LINES_PER_WORKER + 5):
        logs.record("w", "ep", "stdout", f"line {i} " + "x" * worker_logs.LINE_CHARS, None)
    reply = logs.lines(WorkerLogsRequest(endpoint_id="ep", limit=1000))
    assert len(reply.lines) == worker_logs.LINES_PER_WORKER
    assert reply.lines[0].line.startswith("line 5 ") and len(reply.lines[0].line) == worker_logs.LINE_CHARS
    # A cursor of another boot (a restarted agent) reads from the start.
    stale = logs.lines(WorkerLogsRequest(endpoint_id="ep", boot_id="earlier", after_seq=10_000, limit=3))
    assert len(stale.lines) == 3
    current = logs.lines(WorkerLogsRequest(endpoint_id="ep", boot_id=logs.boot_id, after_seq=reply.last_seq))
    assert current.lines == []
    for i in range(worker_logs.WORKERS_KEPT + 1):
        logs.record(f"w{i}", "ep", "stdout", "hi", None)
    kept = {line.worker_id for line in logs.lines(WorkerLogsRequest(endpoint_id="ep", limit=1000)).lines}
    assert "w" not in kept and len(kept) == worker_logs.WORKERS_KEPT
