"""Two schedulers and two autoscalers: SIGKILL the leaders, the standbys take over and the
load submitted before the kill still completes."""

from __future__ import annotations

import asyncio

import pytest

from runplane_bus import Bus, BusSettings
from runplane_testing.cluster import python_command
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.system


def _leases(cluster) -> dict[str, str]:
    async def read():
        bus = await Bus.connect(BusSettings(url=cluster.nats.url))
        try:
            return {key: lease.holder async for key, lease in bus.leases.items()}
        finally:
            await bus.close()

    return asyncio.run(read())


def _service_of(cluster, holder: str) -> str:
    pid = int(holder.split("-")[-2])
    return next(name for name, svc in cluster.services.items() if svc.proc.pid == pid)


def test_standbys_take_over_when_leaders_are_killed(cluster):
    cluster.add("scheduler-b", "runplane_scheduler", RP_LEASE_TTL_S="2")
    cluster.add("autoscaler-b", "runplane_autoscaler", RP_LEASE_TTL_S="2")
    leases = wait_until(lambda: (lambda got: got if {"scheduler", "autoscaler"} <= got.keys() else None)(
        _leases(cluster)), timeout_s=30, what="both leases held")
    killed = {_service_of(cluster, leases[role]) for role in ("scheduler", "autoscaler")}
    # Load in flight when the leaders die: an endpoint at zero with jobs queued, which needs
    # the autoscaler and the scheduler to get (more) workers.
    loaded = cluster.create_endpoint(name="load", workersMin=0, workersMax=2, scalerType="REQUEST_COUNT",
                                     scalerValue=1, command=python_command("examples/fast/handler.py"))
    with cluster.client() as http:
        load = {http.post(f"/v2/{loaded}/run", json={"input": data}).json()["id"]: data
                for data in ({"n": i, "sleep": 0.4} for i in range(10))}
        for name in killed:
            cluster.services[name].kill()
        # A new endpoint scaling from zero needs a live autoscaler and a live scheduler.
        ep = cluster.create_endpoint(name="failover", workersMin=0, workersMax=1,
                                     command=python_command("examples/fast/handler.py"))
        body = http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": {"after": "failover"}}).json()
        assert body["status"] == "COMPLETED" and body["output"] == {"after": "failover"}

        def load_completed():
            bodies = [http.get(f"/v2/{loaded}/status/{job_id}").json() for job_id in load]
            assert not [b for b in bodies if b["status"] in ("FAILED", "CANCELLED", "TIMED_OUT")], bodies
            return bodies if all(b["status"] == "COMPLETED" for b in bodies) else None

        bodies = wait_until(load_completed, timeout_s=60, interval_s=0.25, what="the load completed")
    assert {b["id"]: b["output"] for b in bodies} == load
    now = _leases(cluster)
    assert {_service_of(cluster, now[role]) for role in ("scheduler", "autoscaler")}.isdisjoint(killed)
