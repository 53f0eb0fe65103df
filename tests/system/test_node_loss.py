"""A node agent killed with SIGKILL mid-job: its job is redelivered and completed elsewhere;
under load, its workers are placed again on the other nodes and no job is lost."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_testing.cluster import Cluster, python_command
from runplane_testing.nodewatch import NodeWatch
from runplane_testing.waiting import wait_until

from .conftest import FAST_ENV

pytestmark = pytest.mark.system
NODES = 2


def _record(cluster, ep, job_id):
    async def read():
        bus = await Bus.connect(BusSettings(url=cluster.nats.url))
        try:
            got = await bus.jobs.get(subjects.job_key(ep, job_id))
            return got.value if got else None
        finally:
            await bus.close()

    return asyncio.run(read())


def _records(cluster, ep, job_ids):
    async def read():
        bus = await Bus.connect(BusSettings(url=cluster.nats.url))
        try:
            got = await asyncio.gather(*(bus.jobs.get(subjects.job_key(ep, j)) for j in job_ids))
            return {j: g.value for j, g in zip(job_ids, got, strict=True) if g is not None}
        finally:
            await bus.close()

    return asyncio.run(read())


def _processes_of(worker_id: str) -> list[int]:
    """Live (not zombie) processes whose environment names this worker."""
    marker = f"RUNPOD_POD_ID={worker_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def test_sigkilled_node_agent_job_is_redelivered(cluster, tmp_path):
    ep = cluster.create_endpoint(name="nodeloss", command=python_command("tests/fixtures/workers/rp_handler.py"),
                                 workersMin=1, workersMax=1)
    cluster.wait_workers(ep, 1)
    pidfile = tmp_path / "pid"
    with cluster.client() as http:
        job_id = http.post(f"/v2/{ep}/run", json={"input": {"pidfile": str(pidfile), "grandchild": True}}).json()["id"]
        wait_until(pidfile.exists, timeout_s=30, what="job started")
        record = _record(cluster, ep, job_id)
        assert record.status == "IN_PROGRESS" and record.attempts == 1
        victim, victim_worker = record.node_id, record.worker_id
        assert _processes_of(victim_worker), "the worker's processes should be visible before the kill"
        cluster.services[victim].kill()
        # Nothing the worker started outlives its agent (the RunPod SDK forks a heartbeat process).
        wait_until(lambda: not _processes_of(victim_worker), timeout_s=10, what="worker processes gone")

        def completed():
            body = http.get(f"/v2/{ep}/status/{job_id}").json()
            return body if body["status"] == "COMPLETED" else None

        body = wait_until(completed, timeout_s=60, interval_s=0.2, what="job completed after node loss")
    assert body["output"]["done"] is True
    record = _record(cluster, ep, job_id)
    assert record.node_id != victim
    assert record.attempts == 2


@pytest.fixture
def three_nodes(request):
    """Three node agents with one worker slot each, whatever this machine's CPU count, so an
    endpoint's workers are spread over nodes and a lost node's worker has one place to go."""
    with Cluster(nodes=3, env=dict(FAST_ENV, RP_WORKERS_PER_CPU="0.001")) as c:
        yield c
        if request.session.testsfailed:
            print(c.logs())


def test_sigkilled_node_agent_under_load_loses_no_job(three_nodes):
    cluster = three_nodes
    target = 2
    ep = cluster.create_endpoint(name="loadloss", command=python_command("examples/fast/handler.py"),
                                 workersMin=target, workersMax=target)
    inputs = [{"n": i, "sleep": 0.3 + (i % 3) * 0.1} for i in range(30)]
    inputs[8] = {"n": 8, "sleep": 3.0}  # long enough to be surely running when its node dies
    with NodeWatch(cluster.nats.url) as watch, cluster.client() as http:
        placed = wait_until(lambda: (lambda ws: ws if len({n for n, w in ws if w.state == "idle"}) == target
                                     else None)(watch.workers(ep)), timeout_s=60, what="workers on two nodes")
        assert len(placed) == target
        jobs = {http.post(f"/v2/{ep}/run", json={"input": data}).json()["id"]: data for data in inputs}
        long_job = next(j for j, data in jobs.items() if data["n"] == 8)

        def long_job_running():
            record = _record(cluster, ep, long_job)
            return record if record.status == "IN_PROGRESS" else None

        victim = wait_until(long_job_running, timeout_s=60, interval_s=0.1, what="the long job running").node_id
        before = _records(cluster, ep, list(jobs))
        assert sum(r.status == "COMPLETED" for r in before.values()) < len(jobs) - 5  # mid-load
        cluster.services[victim].kill()
        killed_at = time.monotonic()

        # Its worker is placed again on the free node: back to the target on live nodes.
        survivors = [n for n in ("node1", "node2", "node3") if n != victim]
        wait_until(lambda: len(watch.workers(ep, on=survivors)) == target, timeout_s=60,
                   what=f"{target} workers on the surviving nodes")
        replaced_at = time.monotonic()

        def every_job_done():
            records = _records(cluster, ep, list(jobs))
            assert not [r for r in records.values() if r.status in ("FAILED", "CANCELLED", "TIMED_OUT")]
            return records if len(records) == len(jobs) and all(
                r.status == "COMPLETED" for r in records.values()) else None

        records = wait_until(every_job_done, timeout_s=90, interval_s=0.25, what="every job completed")
        for job_id, data in jobs.items():  # none lost: each has its own output
            body = http.get(f"/v2/{ep}/status/{job_id}").json()
            assert body["status"] == "COMPLETED" and body["output"] == data, body
    assert len(records) == 30
    redelivered = records[long_job]
    assert redelivered.attempts == 2 and redelivered.node_id in survivors
    assert all(r.attempts == 1 or r.node_id in survivors for r in records.values())
    assert replaced_at - killed_at < 30
