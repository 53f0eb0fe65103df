"""Flash boot with containers: idle workers paused (docker pause), parked at zero and woken for
the next job, snapshots (docker commit) that later cold starts start from, the pool's memory
budget measured from the engine's own figures."""

from __future__ import annotations

import pytest

from runplane_testing.cluster import ROOT
from runplane_testing.nodewatch import NodeWatch
from runplane_testing.waiting import wait_until
from tests.docker.conftest import WORKER_IMAGE, containers, docker, run_sync

pytestmark = pytest.mark.docker

# One ~100 MB worker fits in the pool, two do not.
NODE_ENV = {"RP_PARK_MEMORY_MB": "200", "RP_SNAPSHOT_GC_S": "1"}
HANDLER = (ROOT / "examples/flash/handler.py").read_text()
MARKER = "/var/cache/flash-test/initialised"


@pytest.fixture(scope="module")
def cluster(docker_cluster):
    return docker_cluster


@pytest.fixture(scope="module")
def watch(cluster):
    with NodeWatch(cluster.nats.url) as w:
        yield w


def flash_endpoint(cluster, name: str, **env: str) -> str:
    return cluster.create_endpoint(name=name, imageName=WORKER_IMAGE, command=["python", "-u", "-c", HANDLER],
                                   env=env, workersMin=0, workersMax=1, idleTimeout=1, flashboot=True)


def container_of(cluster, worker_id: str) -> dict:
    [found] = [c for c in containers(cluster.docker_node) if c["Config"]["Labels"]["runplane.worker_id"] == worker_id]
    return found


def parked(watch: NodeWatch, ep: str) -> list:
    return [w for _, w in watch.workers(ep, parked=True) if w.state == "parked"]


def test_a_parked_container_is_paused_and_wakes_for_the_next_job(cluster, watch):
    ep = flash_endpoint(cluster, "dk-flash")
    first = run_sync(cluster, ep, {"n": 1})
    assert first["status"] == "COMPLETED", first
    worker_id, pid = first["workerId"], first["output"]["pid"]
    wait_until(lambda: parked(watch, ep), timeout_s=60, what="the worker parked")
    # Paused as soon as its poll is open (at once, or at its next one).
    wait_until(lambda: container_of(cluster, worker_id)["State"]["Paused"], timeout_s=30, what="paused")

    second = run_sync(cluster, ep, {"n": 2})
    assert second["status"] == "COMPLETED" and second["workerId"] == worker_id
    assert second["output"]["pid"] == pid and second["output"]["input"] == {"n": 2}
    assert len([c for c in containers(cluster.docker_node)
                if c["Config"]["Labels"]["runplane.endpoint_id"] == ep]) == 1


def test_a_cold_start_from_the_snapshot_skips_what_initialisation_wrote(cluster, watch):
    ep = flash_endpoint(cluster, "dk-snap", INIT_S="1", INIT_MARKER=MARKER)
    first = run_sync(cluster, ep, {"n": 1})
    assert first["status"] == "COMPLETED" and first["output"]["init_skipped"] is False
    assert first["output"]["init_s"] >= 1
    snapshot = wait_until(lambda: docker("images", "-q", "--filter", f"label=runplane.endpoint_id={ep}").split(),
                          timeout_s=60, what="the snapshot image")
    labels = docker("image", "inspect", "-f", "{{json .Config.Labels}}", snapshot[0])
    assert cluster.docker_node in labels and WORKER_IMAGE in labels

    # Evict the parked worker behind the agent's back: the next job needs a cold start.
    [worker] = wait_until(lambda: parked(watch, ep), timeout_s=60, what="parked")
    docker("rm", "-f", container_of(cluster, worker.worker_id)["Id"])
    wait_until(lambda: not watch.workers(ep, parked=True), timeout_s=60, what="the worker gone")
    second = run_sync(cluster, ep, {"n": 2})
    assert second["status"] == "COMPLETED" and second["workerId"] != worker.worker_id
    assert second["output"]["init_skipped"] is True  # the marker came with the snapshot
    started = container_of(cluster, second["workerId"])
    assert started["Config"]["Image"].startswith("runplane-snapshot:")
    env = dict(e.split("=", 1) for e in started["Config"]["Env"])
    assert env["RUNPOD_POD_ID"] == second["workerId"] and env["RUNPOD_AI_API_KEY"]  # its own, not the snapshot's

    # Deleting the endpoint removes its snapshot too, once no container uses it (RP_SNAPSHOT_GC_S).
    with cluster.client() as http:
        assert http.delete(f"/v1/endpoints/{ep}").status_code == 200
    wait_until(lambda: not docker("images", "-q", "--filter", f"label=runplane.endpoint_id={ep}").split(),
               timeout_s=60, what="the deleted endpoint's snapshot removed")


def test_the_pool_keeps_within_its_memory_budget_least_recently_used_evicted(cluster, watch):
    older = flash_endpoint(cluster, "dk-pool-a", HOLD_MB="100")
    newer = flash_endpoint(cluster, "dk-pool-b", HOLD_MB="100")
    a = run_sync(cluster, older, {})["workerId"]
    wait_until(lambda: parked(watch, older), timeout_s=60, what="A parked")
    b = run_sync(cluster, newer, {})["workerId"]
    wait_until(lambda: parked(watch, newer), timeout_s=60, what="B parked")
    # B's parking evicted A (~100 MB each, the pool holds 200 MB with the SDK's own share).
    wait_until(lambda: not watch.workers(older, parked=True), timeout_s=60, what="A evicted")
    assert [w.worker_id for w in parked(watch, newer)] == [b]
    assert not [c for c in containers(cluster.docker_node) if c["Config"]["Labels"]["runplane.worker_id"] == a]
    logs = cluster.services[cluster.docker_node].log_text()
    assert "parking pool full (200 MB): least recently used" in logs
