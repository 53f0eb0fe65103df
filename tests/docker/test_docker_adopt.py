"""A node agent killed with SIGKILL leaves its containers running; the agent started again
on the node adopts them: the same containers serve jobs, none is duplicated or leaked, and
the job that was running when the agent died still completes."""

from __future__ import annotations

import time

import pytest

from runplane_testing.waiting import wait_until
from tests.docker.conftest import WORKER_IMAGE, containers, docker, run_sync

pytestmark = pytest.mark.docker


def test_restarted_agent_adopts_its_running_containers(docker_cluster):
    cluster, node = docker_cluster, docker_cluster.docker_node
    agent = cluster.services[node]
    ep = cluster.create_endpoint(name="docker-adopt", imageName=WORKER_IMAGE, workersMin=2, workersMax=2)
    cluster.wait_workers(ep, 2, timeout_s=90)
    before = {c["Id"]: c["Config"]["Labels"]["runplane.worker_id"] for c in containers(node)}
    assert len(before) == 2

    with cluster.client() as http:
        job_id = http.post(f"/v2/{ep}/run", json={"input": {"sleep": 4, "tag": "in flight"}}).json()["id"]
        wait_until(lambda: http.get(f"/v2/{ep}/status/{job_id}").json()["status"] == "IN_PROGRESS",
                   timeout_s=30, what="job running")
        agent.kill()  # SIGKILL: no cleanup of any kind
        assert {c["Id"] for c in containers(node, all_states=False)} == set(before)  # still running
        agent.start()  # same node id, same port

        # The job that ran during the restart is not lost.
        def finished():
            body = http.get(f"/v2/{ep}/status/{job_id}").json()
            return body if body["status"] in ("COMPLETED", "FAILED") else None

        body = wait_until(finished, timeout_s=60, interval_s=0.2, what="in-flight job finished")
        assert body["status"] == "COMPLETED" and body["output"]["echo"]["tag"] == "in flight", body

        # Adopted, not replaced: the same containers and worker ids, and nothing else, for a while.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = {c["Id"]: c["Config"]["Labels"]["runplane.worker_id"] for c in containers(node)}
            assert now == before, (before, now)
            time.sleep(0.5)
        health = http.get(f"/v2/{ep}/health").json()
        assert health["workers"]["idle"] + health["workers"]["running"] == 2, health

    # They still serve jobs, on the adopted containers.
    for i in range(4):
        body = run_sync(cluster, ep, {"n": i})
        assert body["status"] == "COMPLETED" and body["output"]["hostname"] in {cid[:12] for cid in before}

    logs = agent.log_text()
    assert logs.count("adopted a running container") == 2

    # A clean stop removes every container and the node's network: nothing leaks.
    agent.stop()
    assert containers(node) == []
    assert not docker("network", "ls", "-q", "--filter", f"name=^runplane-{node}$").strip()
