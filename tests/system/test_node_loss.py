"""A node agent killed with SIGKILL mid-job: its job is redelivered and completed elsewhere."""

from __future__ import annotations

import asyncio

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


def test_sigkilled_node_agent_job_is_redelivered(cluster, tmp_path):
    ep = cluster.create_endpoint(name="nodeloss", command=python_command("tests/fixtures/workers/rp_handler.py"),
                                 workersMin=1, workersMax=1)
    cluster.wait_workers(ep, 1)
    pidfile = tmp_path / "pid"
    with cluster.client() as http:
        job_id = http.post(f"/v2/{ep}/run", json={"input": {"pidfile": str(pidfile)}}).json()["id"]
        wait_until(pidfile.exists, timeout_s=30, what="job started")
        record = _record(cluster, ep, job_id)
        assert record.status == "IN_PROGRESS" and record.attempts == 1
        victim = record.node_id
        cluster.services[victim].kill()

        def completed():
            body = http.get(f"/v2/{ep}/status/{job_id}").json()
            return body if body["status"] == "COMPLETED" else None

        body = wait_until(completed, timeout_s=60, interval_s=0.2, what="job completed after node loss")
    assert body["output"]["done"] is True
    record = _record(cluster, ep, job_id)
    assert record.node_id != victim
    assert record.attempts == 2
