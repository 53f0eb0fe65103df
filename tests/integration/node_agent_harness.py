"""Helpers for node agent tests: run an agent, submit jobs the way the gateway does, find workers."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from msgspec.structs import replace
from runplane_bus import Bus, BusSettings
from runplane_node_agent.main import NodeAgent, start_agent
from runplane_node_agent.settings import AgentSettings
from runplane_proto import subjects as s
from runplane_proto.codec import Codec
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.jobs import JobPolicy, JobQueued, JobRecord, is_terminal
from runplane_proto.nodes import CommandReply, StartWorker, StopWorker
from runplane_testing.waiting import async_wait_until

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "examples" / "echo" / "handler.py"
FAST = ROOT / "examples" / "fast" / "handler.py"
REPLY: Codec[CommandReply] = Codec(CommandReply)


def test_settings(nats_url: str, **overrides: object) -> AgentSettings:
    """Short timeouts so failure paths finish quickly."""
    base = AgentSettings(
        nats_url=nats_url, node_id=f"node-{uuid.uuid4().hex[:8]}", port=0, ack_wait_s=3.0,
        heartbeat_s=0.2, worker_ping_interval_ms=1000, worker_ping_timeout_s=4.0, stop_grace_s=2.0,
        take_poll_s=2.0, shutdown_grace_s=2.0,
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running_agent(nats_url: str, gpus=None, **overrides: object) -> AsyncIterator[NodeAgent]:
    async with contextlib.AsyncExitStack() as stack:
        agent = await start_agent(test_settings(nats_url, **overrides), stack, gpus=gpus)
        try:
            yield agent
        finally:
            await agent.shutdown()


@contextlib.asynccontextmanager
async def connected(nats_url: str) -> AsyncIterator[Bus]:
    bus = await Bus.connect(BusSettings(url=nats_url, name="test"))
    try:
        yield bus
    finally:
        await bus.close()


def echo_spec(endpoint_id: str, **env: str) -> EndpointSpec:
    return EndpointSpec(id=endpoint_id, name=endpoint_id, command=[sys.executable, str(ECHO)],
                        env={"RUNPOD_DEBUG_LEVEL": "INFO", **env})


def fast_spec(endpoint_id: str, **env: str) -> EndpointSpec:
    return EndpointSpec(id=endpoint_id, name=endpoint_id, command=[sys.executable, str(FAST)], env=env)


async def start_worker(bus: Bus, node_id: str, spec: EndpointSpec, worker_id: str | None = None,
                       ready: bool = True) -> str:
    """StartWorker over the bus; with `ready`, wait until the node reports it idle."""
    await bus.endpoints.put(s.endpoint_key(spec.id), spec)
    worker_id = worker_id or f"w{uuid.uuid4().hex[:10]}"
    reply = await bus.request(s.node_cmd(node_id), StartWorker(worker_id=worker_id, spec=spec), REPLY)
    assert reply.ok, reply.error
    if ready:
        await wait_worker_state(bus, node_id, worker_id, "idle", timeout_s=60)
    return worker_id


async def stop_worker(bus: Bus, node_id: str, worker_id: str, only_if_idle: bool = True,
                      park: bool = False) -> CommandReply:
    return await bus.request(s.node_cmd(node_id), StopWorker(worker_id=worker_id, only_if_idle=only_if_idle,
                                                             park=park), REPLY)


async def wait_worker_gone(bus: Bus, node_id: str, worker_id: str, timeout_s: float = 30) -> None:
    async def gone():
        return await worker_info(bus, node_id, worker_id) is None
    await async_wait_until(gone, timeout_s=timeout_s, what=f"worker {worker_id} gone from node status")


async def worker_info(bus: Bus, node_id: str, worker_id: str):
    status = await bus.nodes.get(s.node_key(node_id))
    if status is None:
        return None
    return next((w for w in status.value.workers if w.worker_id == worker_id), None)


async def wait_worker_state(bus: Bus, node_id: str, worker_id: str, state: str, timeout_s: float = 30,
                            where=None):
    async def check():
        info = await worker_info(bus, node_id, worker_id)
        if info is None or info.state != state:
            return None
        return info if where is None or where(info) else None
    return await async_wait_until(check, timeout_s=timeout_s, what=f"worker {worker_id} {state}")


async def submit(bus: Bus, endpoint_id: str, job_input: object, *, job_id: str | None = None,
                 execution_timeout_ms: int = 600_000, ttl_ms: int = 86_400_000,
                 webhook: str | None = None, extra: dict | None = None,
                 submitted_at_ms: int | None = None, low_priority: bool = False,
                 embed: bool = True) -> str:
    """Create the record IN_QUEUE and publish JobQueued carrying it, like the gateway (a job
    with a large input, `embed=False`, goes without its record)."""
    job_id = job_id or f"{uuid.uuid4()}-r1"
    now_ms = submitted_at_ms if submitted_at_ms is not None else int(time.time() * 1000)
    record = JobRecord(
        id=job_id, endpoint_id=endpoint_id, status="IN_QUEUE", submitted_at_ms=now_ms,
        policy=JobPolicy(execution_timeout_ms=execution_timeout_ms, ttl_ms=ttl_ms, low_priority=low_priority),
        input_json=json.dumps(job_input).encode(), webhook=webhook,
        extra_json=json.dumps(extra).encode() if extra else None,
    )
    await bus.jobs.create(s.job_key(endpoint_id, job_id), record)
    await bus.publish_durable(s.job_queue(endpoint_id, low_priority=low_priority),
                              JobQueued(job_id=job_id, endpoint_id=endpoint_id, submitted_at_ms=now_ms,
                                        low_priority=low_priority, record=record if embed else None),
                              msg_id=f"{job_id}:0")
    return job_id


async def record_of(bus: Bus, endpoint_id: str, job_id: str) -> JobRecord | None:
    got = await bus.jobs.get(s.job_key(endpoint_id, job_id))
    return got.value if got else None


async def wait_record(bus: Bus, endpoint_id: str, job_id: str, *statuses: str, timeout_s: float = 30,
                      where=None) -> JobRecord:
    wanted = set(statuses) if statuses else None

    async def check():
        record = await record_of(bus, endpoint_id, job_id)
        if record is None:
            return None
        if wanted is None and not is_terminal(record.status) or wanted and record.status not in wanted:
            return None
        return record if where is None or where(record) else None
    return await async_wait_until(check, timeout_s=timeout_s, what=f"job {job_id} {statuses or 'terminal'}")


def output_of(record: JobRecord) -> object:
    return None if record.output_json is None else json.loads(record.output_json)


def worker_pid(worker_id: str) -> int | None:
    """The process-group leader running worker `worker_id` (found by its RUNPOD_POD_ID)."""
    needle = f"RUNPOD_POD_ID={worker_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            if needle in env and os.getpgid(pid) == pid:
                return pid
        except (OSError, ProcessLookupError):
            continue
    return None


def worker_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = [i.decode(errors="replace") for i in fh.read().split(b"\0") if b"=" in i]
    return dict(i.split("=", 1) for i in items)


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
