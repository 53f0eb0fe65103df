"""deploy/nats/cluster.conf: three nats-server processes form a JetStream cluster (only their
addresses are given on the command line); the services log in with their users and run with
RP_NATS_REPLICAS=3, every stream and bucket has three replicas, and jobs still complete after
one of the three servers is killed."""

from __future__ import annotations

import asyncio
import sys

import nats
import pytest

from runplane_proto import subjects as s
from runplane_testing.natscluster import NATS_DIR, NatsNode, nats_members, new_passwords
from runplane_testing.waiting import wait_until
from tests.deploy.natsauth import AuthCluster

pytestmark = pytest.mark.system

ECHO = [sys.executable, "examples/echo/handler.py"]


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory, request):
    workdir = tmp_path_factory.mktemp("nats-cluster")
    passwords = new_passwords()
    servers = nats_members(workdir, config=NATS_DIR / "cluster.conf", passwords=passwords)
    try:
        for server in servers:
            server.start()
        yield servers, passwords, workdir
    finally:
        if request.session.testsfailed:
            for server in servers:
                print(f"===== {server.name} =====\n{server.log_text()[-3000:]}")
        for server in servers:
            server.stop()


def meta_cluster(server: NatsNode) -> dict | None:
    return server.monitor("/jsz").get("meta_cluster")


def test_three_servers_form_one_jetstream_cluster(nats_cluster):
    servers, _, _ = nats_cluster

    def formed() -> bool:
        for server in servers:
            meta = meta_cluster(server)
            routes = server.monitor("/routez")["routes"]
            peers = {r.get("remote_name") for r in routes}
            if not meta or not meta.get("leader") or meta.get("cluster_size") != 3:
                return False
            if not {x.name for x in servers} - {server.name} <= peers:
                return False
        return True

    wait_until(formed, timeout_s=60, interval_s=0.3, what="a 3-node JetStream cluster with a meta leader")
    assert {meta_cluster(server)["name"] for server in servers} == {"runplane"}
    assert len({meta_cluster(server)["leader"] for server in servers}) == 1


def test_services_run_jobs_on_replicated_streams_and_survive_a_lost_server(nats_cluster, request):
    servers, passwords, workdir = nats_cluster
    wait_until(lambda: all((meta_cluster(x) or {}).get("leader") for x in servers), timeout_s=60,
               what="meta leader")
    cluster = AuthCluster(servers, workdir, passwords, env={"RP_NATS_REPLICAS": "3"})
    try:
        cluster.start(nodes=1)
        endpoint = cluster.create_endpoint(name="echo", command=ECHO, workersMin=1)
        with cluster.client() as http:
            job = http.post(f"/v2/{endpoint}/run", json={"input": {"text": "one"}}).json()
            assert cluster.wait_job(endpoint, job["id"])["output"]["upper"] == "ONE"

        replicas = asyncio.run(_replicas(servers[0].url, passwords["admin"]))
        expected = [s.STREAM_JOBS, s.STREAM_CHUNKS, s.STREAM_WEBHOOKS, *(f"KV_{b}" for b in (
            s.KV_JOBS, s.KV_ENDPOINTS, s.KV_NODES, s.KV_SCALE, s.KV_PLACEMENT, s.KV_LEASES, s.KV_CURSORS)),
            f"OBJ_{s.OBJ_PAYLOADS}"]
        for stream in expected:
            assert replicas.get(stream) == (3, 2), (stream, replicas)  # configured 3, two followers

        # Kill the server that leads the job queue: the stream elects another leader, the
        # services reconnect to the others, and new jobs complete.
        leader = asyncio.run(_stream_leader(servers[0].url, passwords["admin"], s.STREAM_JOBS))
        victim = next(x for x in servers if x.name == leader)
        victim.kill()
        with cluster.client() as http:
            def second_job() -> dict | None:
                resp = http.post(f"/v2/{endpoint}/run", json={"input": {"text": "two"}})
                return resp.json() if resp.status_code == 200 else None

            job = wait_until(second_job, timeout_s=60, interval_s=0.5, what="a job accepted after the loss")
            assert cluster.wait_job(endpoint, job["id"], timeout_s=90)["output"]["upper"] == "TWO"
        for server in servers:
            if server is not victim:
                assert server.violations() == [], "\n".join(server.violations())
    finally:
        if request.session.testsfailed:
            print(cluster.logs())
        cluster.stop()


async def _replicas(url: str, password: str) -> dict[str, tuple[int, int]]:
    nc = await nats.connect(url, user="admin", password=password)
    try:
        js = nc.jetstream()
        found = {}
        for info in await js.streams_info():
            found[info.config.name] = (info.config.num_replicas, len(info.cluster.replicas or []))
        return found
    finally:
        await nc.close()


async def _stream_leader(url: str, password: str, stream: str) -> str:
    nc = await nats.connect(url, user="admin", password=password)
    try:
        return (await nc.jetstream().stream_info(stream)).cluster.leader
    finally:
        await nc.close()
