"""A node agent killed with SIGKILL mid-job: its job is redelivered and completed elsewhere."""

from __future__ import annotations

import asyncio
import os

import pytest

from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_testing.cluster import python_command
from runplane_testing.waiting import wait_until

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
