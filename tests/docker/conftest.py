"""Docker tier: a real Docker engine, the images of ./scripts/images, real NATS and services.

A missing engine or image fails these tests (CI installs and builds both through
./scripts/test); deselect them with `-m "not docker"` on a machine without Docker.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess

import pytest

from runplane_node_agent.runtimes.docker import LABEL_NODE, node_hash
from runplane_node_agent.runtimes.netguard import Guard
from runplane_testing.cluster import Cluster
from runplane_testing.waiting import wait_until

WORKER_IMAGE = "runplane/test-worker:latest"

# Short timings so failure paths finish quickly (as in tests/system).
FAST_ENV = {
    "RP_RUNSYNC_WAIT_MS": "2000",
    "RP_ACK_WAIT_S": "3",
    "RP_NODE_LOSS_TIMEOUT_S": "10",
    "RP_WORKER_PING_INTERVAL_MS": "1000",
    "RP_STOP_GRACE_S": "2",
    "RP_LEASE_TTL_S": "2",
}


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def bridge_address() -> str:
    """The host's address on Docker's default bridge: the network's gateway, or, when the engine
    did not record one (it found docker0 already there when it started), docker0's own."""
    gateway = docker("network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}").strip()
    if gateway and gateway != "<no value>":
        return gateway
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True).stdout
    found = shown.split(" inet ", 1)[1].split("/", 1)[0] if " inet " in shown else ""
    assert found, f"no address of Docker's bridge: gateway {gateway!r}, docker0 {shown!r}"
    return found


def containers(node_id: str, *, all_states: bool = True) -> list[dict]:
    """`docker inspect` of the containers labelled with this node."""
    ids = docker("ps", "-q", *(["-a"] if all_states else []), "--filter", f"label={LABEL_NODE}={node_id}").split()
    return json.loads(docker("inspect", *ids)) if ids else []


def run_sync(cluster, endpoint_id: str, payload: dict, timeout_s: float = 60) -> dict:
    """/run, then /status until the job is terminal; the final status body."""
    with cluster.client() as http:
        job_id = http.post(f"/v2/{endpoint_id}/run", json={"input": payload}).json()["id"]

        def finished():
            body = http.get(f"/v2/{endpoint_id}/status/{job_id}").json()
            return body if body["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT") else None

        return wait_until(finished, timeout_s=timeout_s, interval_s=0.1, what=f"job {job_id} finished")



@pytest.fixture(scope="session")
def docker_engine():
    """Fails (never skips) when the engine or the test image is missing."""
    try:
        docker("info", "--format", "{{.ServerVersion}}")
    except (OSError, AssertionError) as exc:
        pytest.fail(f"no Docker engine: run ./scripts/docker-up ({exc})")
    try:
        docker("image", "inspect", WORKER_IMAGE)
    except AssertionError:
        pytest.fail(f"image {WORKER_IMAGE} is missing: run ./scripts/images")


def remove_node_leftovers(node_id: str) -> list[str]:
    """Remove what a node left behind (a killed agent); returns what there was."""
    left = [c["Id"][:12] for c in containers(node_id)]
    if left:
        docker("rm", "-f", *left, check=False)
    snapshots = docker("images", "-q", "--filter", f"label={LABEL_NODE}={node_id}").split()
    if snapshots:  # flash boot's snapshot images of this node
        docker("rmi", "-f", *sorted(set(snapshots)), check=False)
    network = f"runplane-{node_id}"
    if docker("network", "ls", "-q", "--filter", f"name=^{network}$").strip():
        docker("network", "rm", network, check=False)
        left.append(network)
    guard = Guard(bridge=f"rp-{node_hash(node_id)}", chain=f"RP-{node_hash(node_id)}", gateway="", agent_port=0,
                  nats_urls=())
    asyncio.run(guard.remove())
    return left


@pytest.fixture(scope="module")
def docker_cluster(request, docker_engine):
    """A whole Runplane with one Docker node (module setting NODE_ENV adds agent settings)."""
    node_id = f"dk-{secrets.token_hex(3)}"
    env = dict(FAST_ENV)
    env.update(getattr(request.module, "CLUSTER_ENV", {}))
    cluster = Cluster(nodes=0, env=env)
    with cluster:
        cluster.add_node(node_id, RP_RUNTIME="docker", **getattr(request.module, "NODE_ENV", {}))
        cluster.docker_node = node_id
        yield cluster
        if request.session.testsfailed:
            print(cluster.logs())
    remove_node_leftovers(node_id)
