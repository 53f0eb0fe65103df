"""Workers as containers: RunPod-SDK jobs end to end, what a container gets, what it can
reach, and containers that exit or run out of memory in the middle of a job."""

from __future__ import annotations

import re
import socket
import time

import pytest

from runplane_testing.waiting import wait_until
from tests.docker.conftest import WORKER_IMAGE, containers, docker, run_sync

pytestmark = pytest.mark.docker

CLUSTER_ENV = {"RP_MAX_ATTEMPTS": "2"}
NODE_ENV = {"RP_WORKER_MEMORY_MB": "256", "RP_WORKER_CPUS": "1.5"}


@pytest.fixture(scope="module")
def cluster(docker_cluster):
    return docker_cluster


@pytest.fixture(scope="module")
def echo(cluster):
    """An endpoint of the image alone (its own CMD runs the handler)."""
    ep = cluster.create_endpoint(name="docker-echo", imageName=WORKER_IMAGE, workersMin=1, workersMax=1)
    cluster.wait_workers(ep, 1, timeout_s=90)
    return ep


def worker_containers(cluster, endpoint_id: str) -> list[dict]:
    return [c for c in containers(cluster.docker_node, all_states=False)
            if c["Config"]["Labels"].get("runplane.endpoint_id") == endpoint_id]


def primary_address() -> str | None:
    """This host's address on its default route (no packet is sent), None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        return sock.getsockname()[0]


def test_runpod_sdk_job_completes_through_the_gateway(cluster, echo):
    import runpod

    runpod.api_key = cluster.api_key
    runpod.endpoint_url_base = f"{cluster.gateway_url}/v2"
    out = runpod.Endpoint(echo).run_sync({"text": "hi", "env": ["RUNPOD_POD_ID", "RP_NATS_URL", "PATH"]},
                                         timeout=60)
    [container] = worker_containers(cluster, echo)
    assert out["echo"]["text"] == "hi"
    assert out["hostname"] == container["Config"]["Hostname"]
    assert out["env"]["RUNPOD_POD_ID"] == container["Config"]["Labels"]["runplane.worker_id"]
    assert out["env"]["RP_NATS_URL"] is None
    assert out["env"]["PATH"].startswith("/opt/venv/bin:")  # the image's, not the agent's


def test_container_has_labels_limits_env_and_no_new_privileges(cluster):
    ep = cluster.create_endpoint(name="docker-cmd", imageName=WORKER_IMAGE, workersMin=1, workersMax=1,
                                 command=["python", "-u", "/opt/worker/handler.py"], env={"GREETING": "hello"})
    cluster.wait_workers(ep, 1, timeout_s=90)
    [container] = worker_containers(cluster, ep)
    labels, host = container["Config"]["Labels"], container["HostConfig"]
    assert labels["runplane.node_id"] == cluster.docker_node
    assert labels["runplane.worker_id"] and labels["runplane.endpoint_id"] == ep
    assert container["Config"]["Cmd"] == ["python", "-u", "/opt/worker/handler.py"]
    assert host["Memory"] == 256 * 1024 * 1024 and host["NanoCpus"] == 1_500_000_000
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"])
    # Nothing that would hand the worker the host: not privileged, no Docker socket mounted.
    assert host["Privileged"] is False and not host.get("CapAdd")
    mounted = [m.get("Source", "") + " -> " + m.get("Destination", "") for m in container.get("Mounts") or []]
    mounted += list(host.get("Binds") or [])
    assert not [m for m in mounted if "docker.sock" in m], mounted
    assert host["NetworkMode"] == f"runplane-{cluster.docker_node}" and host["Init"] is True
    env = dict(e.split("=", 1) for e in container["Config"]["Env"])
    assert env["GREETING"] == "hello" and env["RUNPOD_POD_ID"] == labels["runplane.worker_id"]
    assert env["RUNPOD_AI_API_KEY"] and not any(k.startswith("RP_") for k in env)
    assert env["RUNPOD_WEBHOOK_GET_JOB"].startswith("http://") and "/job-take/" in env["RUNPOD_WEBHOOK_GET_JOB"]
    assert "VIRTUAL_ENV" not in env and "HOME" not in env  # nothing of the agent's own environment
    assert "DOCKER_HOST" not in env
    out = run_sync(cluster, ep, {"env": ["GREETING"]})
    assert out["status"] == "COMPLETED" and out["output"]["env"] == {"GREETING": "hello"}


def test_worker_reaches_the_agent_but_not_nats_nor_other_host_ports(cluster, echo):
    [container] = worker_containers(cluster, echo)
    agent_url = dict(e.split("=", 1) for e in container["Config"]["Env"])["RUNPOD_WEBHOOK_PING"]
    gateway, agent_port = re.match(r"http://([\d.]+):(\d+)/", agent_url).groups()
    nats_port = cluster.nats.port
    host_ip = primary_address() or gateway
    # Something listening on every address of this host: still out of the workers' reach.
    with socket.create_server(("0.0.0.0", 0)) as listener:
        open_port = listener.getsockname()[1]
        socket.create_connection((gateway, open_port), timeout=2).close()  # reachable from the host
        targets = [[gateway, agent_port], [gateway, nats_port], ["127.0.0.1", nats_port],
                   [host_ip, nats_port], [gateway, open_port], [host_ip, open_port], [gateway, cluster.http_port]]
        reached = run_sync(cluster, echo, {"connect": targets})["output"]["reached"]
    assert reached.pop(f"{gateway}:{agent_port}") == "open"
    assert all(result != "open" for result in reached.values()), reached


def test_container_exiting_mid_job_is_retried_then_fails_with_the_reason(cluster, echo):
    first = {c["Id"] for c in worker_containers(cluster, echo)}
    body = run_sync(cluster, echo, {"exit": 3}, timeout_s=120)
    assert body["status"] == "FAILED"
    assert "exited with code 3" in body["error"] and "attempt 2 of 2" in body["error"], body
    # Both attempts ran (each in its own container) and their output reached the agent's log.
    logs = cluster.services[cluster.docker_node].log_text()
    assert logs.count(f"exiting with 3 in the middle of job {body['id']}") == 2
    # The worker was replaced: a new container serves the next job.
    cluster.wait_workers(echo, 1, timeout_s=90)
    assert run_sync(cluster, echo, {"text": "after"})["status"] == "COMPLETED"
    assert {c["Id"] for c in worker_containers(cluster, echo)}.isdisjoint(first)


def test_oom_killed_container_is_reaped_and_its_job_failed(cluster, echo):
    started = time.monotonic()
    body = run_sync(cluster, echo, {"allocate_mb": 1024}, timeout_s=120)
    assert body["status"] == "FAILED" and "out of memory" in body["error"], body
    assert "attempt 2 of 2" in body["error"]
    cluster.wait_workers(echo, 1, timeout_s=90)
    assert run_sync(cluster, echo, {"text": "after oom"})["status"] == "COMPLETED"
    # Reaped: no stopped container of this node stays behind.
    assert all(c["State"]["Running"] for c in containers(cluster.docker_node)), time.monotonic() - started


def test_node_reports_docker_capabilities_without_checkpoint(cluster, echo):
    logs = cluster.services[cluster.docker_node].log_text()
    assert "docker runtime ready" in logs
    assert "checkpoint/restore unavailable" in logs
    line = next(line for line in logs.splitlines() if "docker runtime ready" in line)
    assert "pause" in line and "snapshot" in line and "checkpoint" not in line
    assert docker("network", "inspect", f"runplane-{cluster.docker_node}")


def test_silent_container_is_recycled(cluster):
    # Without flash boot: the agent itself never pauses this endpoint's idle workers.
    ep = cluster.create_endpoint(name="docker-silent", imageName=WORKER_IMAGE, workersMin=1, workersMax=1,
                                 flashboot=False)
    cluster.wait_workers(ep, 1, timeout_s=90)
    [frozen] = worker_containers(cluster, ep)
    worker_id = frozen["Config"]["Labels"]["runplane.worker_id"]
    docker("pause", frozen["Id"])  # alive but silent: no pings, no polls
    wait_until(lambda: frozen["Id"] not in docker("ps", "-aq", "--no-trunc"), timeout_s=60, interval_s=0.5,
               what="the silent container removed")
    logs = cluster.services[cluster.docker_node].log_text()
    assert re.search(rf"recycling worker .*reason='no ping for 3 s'.* worker_id={worker_id}", logs)
    cluster.wait_workers(ep, 1, timeout_s=60)
    assert run_sync(cluster, ep, {"text": "after silence"})["status"] == "COMPLETED"
