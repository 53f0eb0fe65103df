"""deploy/nats: a real nats-server with the generated accounts config, each service logged in
as its own user with only its own subjects. Every path a job can take (sync, async, stream,
large payloads in the object store, cancel, webhook, purge, retention, node loss, endpoint
deletion) runs without a single permission violation; a node agent's user cannot write an
endpoint spec, command a node or read another service's replies."""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import threading
import time

import httpx
import nats
import pytest

from runplane_bus import Bus, BusSettings
from runplane_gateway.app import Gateway
from runplane_gateway.settings import GatewaySettings
from runplane_proto import subjects as s
from runplane_proto.ids import JOB_ID_SUFFIX
from runplane_testing.natscluster import NATS_DIR, ROLES, NatsNode, new_passwords
from runplane_testing.waiting import wait_until
from tests.deploy.natsauth import AuthCluster

pytestmark = pytest.mark.system

ECHO = [sys.executable, "examples/echo/handler.py"]
LARGE = "x" * (300 * 1024)  # above the 256 KiB inline limit: kept in the object store


@pytest.fixture(scope="module")
def secured(tmp_path_factory, request):
    workdir = tmp_path_factory.mktemp("nats-auth")
    passwords = new_passwords()
    server = NatsNode(workdir, config=NATS_DIR / "single.conf", passwords=passwords).start()
    cluster = AuthCluster([server], workdir, passwords, env={
        "RP_RESULT_RETENTION_S": "4", "RP_SYNC_RESULT_RETENTION_S": "4", "RP_JANITOR_INTERVAL_S": "1",
    })
    try:
        cluster.start(nodes=2)
        yield cluster, server
    finally:
        if request.session.testsfailed:
            print(cluster.logs())
            print(server.log_text()[-4000:])
        cluster.stop()
        server.stop()


@pytest.fixture(scope="module")
def echo_endpoint(secured):
    cluster, _ = secured
    return cluster.create_endpoint(name="echo", command=ECHO, workersMin=1)


class Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooks.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_each_service_is_logged_in_as_its_own_user(secured):
    cluster, server = secured

    def users() -> set[str] | None:
        conns = server.monitor("/connz?auth=1&limit=1000")["connections"]
        found = {c.get("authorized_user") for c in conns}
        return found if set(ROLES) <= found else None

    assert set(ROLES) <= wait_until(users, timeout_s=30, what="every service connected")


def test_every_job_path_runs_without_a_permission_violation(secured, echo_endpoint):
    cluster, server = secured
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    stream_ep = cluster.create_endpoint(name="echo-stream", command=ECHO, env={"ECHO_MODE": "stream"})
    try:
        with cluster.client() as http_:
            # /runsync with a large input and output (object store both ways).
            body = http_.post(f"/v2/{echo_endpoint}/runsync", json={"input": {"text": LARGE}}).json()
            body = body if body["status"] == "COMPLETED" else cluster.wait_job(echo_endpoint, body["id"])
            assert body["status"] == "COMPLETED" and body["output"]["echo"]["text"] == LARGE

            # /run + /status, with a webhook.
            job = http_.post(f"/v2/{echo_endpoint}/run", json={
                "input": {"text": "hi"}, "webhook": f"http://127.0.0.1:{hooks.server_port}/hook"}).json()
            assert cluster.wait_job(echo_endpoint, job["id"])["output"]["upper"] == "HI"
            wait_until(lambda: any(h.get("id") == job["id"] for h in Hooks.received), timeout_s=30,
                       what="webhook delivered")

            # /stream reads chunks from JOBCHUNKS with a cursor in rp-stream-cursors.
            job = http_.post(f"/v2/{stream_ep}/run", json={"input": {"stream": 3, "text": "a"}}).json()
            assert cluster.wait_job(stream_ep, job["id"])["status"] == "COMPLETED"
            chunks = http_.get(f"/v2/{stream_ep}/stream/{job['id']}").json()["stream"]
            assert [c["output"]["index"] for c in chunks] == [0, 1, 2]

            # Cancel a running job; purge a queued one; /health reads consumers and nodes.
            job = http_.post(f"/v2/{echo_endpoint}/run", json={"input": {"sleep": 30}}).json()
            wait_until(lambda: http_.get(f"/v2/{echo_endpoint}/status/{job['id']}").json()["status"]
                       == "IN_PROGRESS", timeout_s=30, what="job running")
            queued = http_.post(f"/v2/{echo_endpoint}/run", json={"input": {"text": "later"}}).json()
            assert http_.post(f"/v2/{echo_endpoint}/cancel/{job['id']}").json()["status"] == "CANCELLED"
            http_.post(f"/v2/{echo_endpoint}/purge-queue")
            assert cluster.wait_job(echo_endpoint, queued["id"])["status"] in ("CANCELLED", "COMPLETED")
            assert http_.get(f"/v2/{echo_endpoint}/health").status_code == 200
            # What the CLI and the dashboard read: nodes, workers, jobs, worker logs (request/reply).
            for path in ("/v1/nodes", f"/v1/endpoints/{echo_endpoint}/workers",
                         f"/v1/endpoints/{echo_endpoint}/jobs?limit=5", f"/v1/endpoints/{echo_endpoint}/logs"):
                assert http_.get(path).status_code == 200, path

            # Retention: the scheduler's janitor deletes old records and their payload objects.
            def expired() -> bool:
                return http_.get(f"/v2/{echo_endpoint}/status/{body['id']}").status_code == 404

            wait_until(expired, timeout_s=30, what="the large job's record expired")

            # Deleting an endpoint deletes its consumer.
            assert http_.delete(f"/v1/endpoints/{stream_ep}").status_code in (200, 204)

        # A node agent that dies is removed from rp-nodes by the scheduler.
        cluster.services["node2"].kill()
        asyncio.run(_wait_node_gone(server.url, cluster.passwords["admin"], "node2"))
    finally:
        hooks.shutdown()
    time.sleep(0.5)  # let a last violation, if any, reach the log
    assert server.violations() == [], "\n".join(server.violations())
    for name, svc in cluster.services.items():
        assert "permissions violation" not in svc.log_text().lower(), name


async def _wait_node_gone(url: str, admin_password: str, node_id: str) -> None:
    bus = await Bus.connect(BusSettings(url=url, user="admin", password=admin_password, name="test-admin"))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await bus.nodes.get(s.node_key(node_id)) is None:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{node_id} still in {s.KV_NODES}")
    finally:
        await bus.close()


async def _as_node_agent(url: str, password: str):
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(url, user="node-agent", password=password, inbox_prefix="_INBOX.node-agent",
                            error_cb=on_error, max_reconnect_attempts=0)
    return nc, errors


def test_a_node_agent_cannot_write_an_endpoint_spec(secured, echo_endpoint):
    cluster, server = secured

    async def attempt() -> None:
        nc, errors = await _as_node_agent(server.url, cluster.passwords["node-agent"])
        try:
            js = nc.jetstream(timeout=2)
            endpoints = await js.key_value(s.KV_ENDPOINTS)
            assert (await endpoints.get(s.endpoint_key(echo_endpoint))).value  # it may read specs
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
                await endpoints.put(s.endpoint_key("forged"), b"{}")
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
                await endpoints.put(s.endpoint_key(echo_endpoint), b"{}")
            await asyncio.sleep(0.2)
            assert any(f'publish to "$kv.{s.KV_ENDPOINTS}.forged"' in e for e in errors), errors
        finally:
            await nc.close()
        admin = await nats.connect(server.url, user="admin", password=cluster.passwords["admin"])
        try:
            kv = await admin.jetstream().key_value(s.KV_ENDPOINTS)
            with pytest.raises(nats.js.errors.KeyNotFoundError):
                await kv.get(s.endpoint_key("forged"))
            assert (await kv.get(s.endpoint_key(echo_endpoint))).value != b"{}"
        finally:
            await admin.close()

    asyncio.run(attempt())
    assert any('"RUNPLANE/user:node-agent" - Publish Violation - Subject "$KV.rp-endpoints.forged"' in line
               for line in server.violations())


def test_a_node_agent_cannot_command_nodes_scale_or_read_other_replies(secured):
    cluster, server = secured

    async def attempt() -> list[str]:
        nc, errors = await _as_node_agent(server.url, cluster.passwords["node-agent"])
        try:
            await nc.publish(s.node_cmd("node1"), b"x")        # only the scheduler commands nodes
            await nc.publish(f"$KV.{s.KV_SCALE}.ep", b"x")     # only the autoscaler sets targets
            await nc.subscribe("_INBOX.gateway.>")             # the gateway's replies
            await nc.subscribe(s.job_events("j1"))            # only gateways follow job events
            await nc.flush()
            await asyncio.sleep(0.3)
            return errors
        finally:
            await nc.close()

    errors = asyncio.run(attempt())
    for expected in (f'publish to "{s.node_cmd("node1")}"', f'publish to "$kv.{s.KV_SCALE}.ep"',
                     'subscription to "_inbox.gateway.>"', f'subscription to "{s.job_events("j1")}"'):
        assert any(expected in e for e in errors), (expected, errors)


def test_only_the_gateway_reads_or_writes_api_key_hashes(secured):
    """The gateway (as its own user) keeps API keys in KV rp-api-keys; no other service's user
    may read a hash there, or put a key of its own."""
    cluster, server = secured
    with cluster.client() as http:
        made = http.post("/v1/keys", json={"name": "ops", "scope": "admin"})
        assert made.status_code == 201, made.text
    key_id = made.json()["id"]

    async def attempt(role: str) -> None:
        nc = await nats.connect(server.url, user=role, password=cluster.passwords[role],
                                inbox_prefix=f"_INBOX.{role}", max_reconnect_attempts=0)
        try:
            keys = await nc.jetstream(timeout=2).key_value(s.KV_API_KEYS)  # the bucket exists for all
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
                await keys.get(s.api_key_key(key_id))
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
                await keys.put(s.api_key_key("forged"), b"{}")
        finally:
            await nc.close()

    for role in ("node-agent", "scheduler", "autoscaler"):
        asyncio.run(attempt(role))
    violations = server.violations()
    for role in ("node-agent", "scheduler", "autoscaler"):
        assert any(f'"RUNPLANE/user:{role}" - Publish Violation - Subject "$KV.rp-api-keys.forged"' in line
                   for line in violations), (role, violations[-5:])
    with cluster.client() as http:  # the gateway itself reads and revokes it
        assert http.delete(f"/v1/keys/{key_id}").status_code == 200


def test_a_wrong_password_is_refused(secured):
    _, server = secured

    async def attempt() -> None:
        with pytest.raises(Exception) as info:
            await nats.connect(server.url, user="gateway", password="wrong", max_reconnect_attempts=0,
                               allow_reconnect=False, connect_timeout=2)
        assert "authorization" in str(info.value).lower()

    asyncio.run(attempt())


def test_the_gateway_may_take_back_a_queued_message_and_an_agent_may_not(secured):
    """A submit whose record could not be written takes its queued message back (the gateway's
    Bus.delete_queued); no other service may delete from the queue."""
    cluster, server = secured

    async def attempt() -> None:
        gateway = await Bus.connect(BusSettings(url=server.url, name="test-gateway", user="gateway",
                                                password=cluster.passwords["gateway"],
                                                inbox_prefix="_INBOX.gateway"))
        try:
            seq = (await gateway.js.publish(s.job_queue("gone"), b"not a job")).seq
            await gateway.delete_queued(seq)
            with pytest.raises(nats.js.errors.NotFoundError):
                await gateway.js.get_msg(s.STREAM_JOBS, seq)
            seq = (await gateway.js.publish(s.job_queue("gone"), b"not a job")).seq
        finally:
            await gateway.close()
        nc, errors = await _as_node_agent(server.url, cluster.passwords["node-agent"])
        try:
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
                await nc.jetstream(timeout=2).delete_msg(s.STREAM_JOBS, seq)
        finally:
            await nc.close()
        admin = await nats.connect(server.url, user="admin", password=cluster.passwords["admin"])
        try:
            assert (await admin.jetstream().get_msg(s.STREAM_JOBS, seq)).data == b"not a job"
            await admin.jetstream().delete_msg(s.STREAM_JOBS, seq)
        finally:
            await admin.close()

    asyncio.run(attempt())
    violations = server.violations()
    assert not any('"RUNPLANE/user:gateway"' in line for line in violations), violations[-5:]
    assert any('"RUNPLANE/user:node-agent" - Publish Violation - Subject "$JS.API.STREAM.MSG.DELETE.JOBS"'
               in line for line in violations), violations[-5:]


def test_a_gateway_that_may_not_add_the_republish_still_answers_runsync(secured, echo_endpoint):
    """An rp-jobs made by an older version lacks the republish /runsync listens to; a gateway
    logged in as its own user may not change the topology, so it waits with a subscription
    per request (and says so) instead of hearing nothing. Runs last: it adds a violation."""
    cluster, server = secured

    async def attempt() -> dict:
        admin = await nats.connect(server.url, user="admin", password=cluster.passwords["admin"])
        js = admin.jetstream()
        config = (await js.stream_info(f"KV_{s.KV_JOBS}")).config
        republish, config.republish = config.republish, None
        assert republish is not None
        await js.update_stream(config)  # as an older version made it
        try:
            bus = await Bus.connect(BusSettings(url=server.url, name="test-gateway", user="gateway",
                                                password=cluster.passwords["gateway"],
                                                inbox_prefix="_INBOX.gateway"))
            gateway = await Gateway.start(bus, GatewaySettings(api_key="rp_fallback_key"), webhooks=False)
            try:
                assert gateway.sync_ends is None
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                             base_url="http://gateway", timeout=60) as client:
                    resp = await client.post(f"/v2/{echo_endpoint}/runsync?wait=30000", json={"input": {"text": "fb"}},
                                             headers={"Authorization": "Bearer rp_fallback_key"})
                return resp.json()
            finally:
                await gateway.stop()
                await bus.close()
        finally:
            config.republish = republish
            await js.update_stream(config)
            await admin.close()

    body = asyncio.run(attempt())
    assert body["status"] == "COMPLETED" and body["output"]["upper"] == "FB", body
    assert body["id"].startswith("sync-") and body["id"].endswith(JOB_ID_SUFFIX)
    assert any('"RUNPLANE/user:gateway" - Publish Violation - Subject "$JS.API.STREAM.UPDATE.KV_rp-jobs"'
               in line for line in server.violations())
