"""Security boundaries of the gateway, against a real nats-server: API keys made through
/v1/keys (stored hashed, listed without secrets, scoped to endpoints, revoked on every
replica), endpoint env values masked in every answer, and RunPod's request limits (429)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from runplane_bus import Bus, BusSettings
from runplane_gateway.app import Gateway
from runplane_gateway.settings import GatewaySettings
from runplane_proto import subjects
from runplane_proto.nodes import NodeStatus, WorkerInfo
from runplane_testing.waiting import async_wait_until

KEY = "test-bootstrap-admin-key"
# RunPod's limits are on by default: the settings say nothing about them.
SETTINGS = GatewaySettings(api_key=KEY)
FIGURES: dict[str, float] = {}


class Replica:
    def __init__(self, bus: Bus, gateway: Gateway) -> None:
        self.bus, self.gateway = bus, gateway

    def client(self, key: str | None = KEY) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.gateway.app), base_url="http://gw",
                                 headers=headers, timeout=30)


@pytest.fixture
async def replicas(nats_server) -> AsyncIterator[list[Replica]]:
    """Two gateway replicas, each with its own NATS connection, as two processes would be."""
    started = []
    for i in range(2):
        bus = await Bus.connect(BusSettings(url=nats_server.url, name=f"gateway-{i}"))
        started.append(Replica(bus, await Gateway.start(bus, SETTINGS, webhooks=False)))
    yield started
    for replica in started:
        await replica.gateway.stop()
        await replica.bus.close()


async def _endpoint(http: httpx.AsyncClient, name: str, **spec: object) -> str:
    resp = await http.post("/v1/endpoints", json={"name": name, "command": ["true"], **spec})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def _new_key(http: httpx.AsyncClient, **body: object) -> dict:
    resp = await http.post("/v1/keys", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def _refused(resp: httpx.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert all(word in error for word in words), error


# -- API keys -----------------------------------------------------------------------------------


async def test_keys_are_stored_hashed_and_listed_without_their_secret(replicas) -> None:
    async with replicas[0].client() as admin:
        ep = await _endpoint(admin, "a")
        made = await _new_key(admin, name="ci", scope="endpoint", endpoints=[ep, ep])
        secret = made.pop("key")
        assert secret.startswith("rpk_" + made["id"] + "_") and len(secret) > 50
        assert made | {"createdAtMs": 0} == {"id": made["id"], "name": "ci", "prefix": f"rpk_{made['id']}",
                                             "scope": "endpoint", "endpoints": [ep], "createdAtMs": 0}
        listed = await admin.get("/v1/keys")
        one = await admin.get(f"/v1/keys/{made['id']}")
        assert listed.json() == [made] and one.json() == made
        random_part = secret[len(made["prefix"]) + 1:]
        assert random_part not in listed.text and random_part not in one.text
        _refused(await admin.get("/v1/keys/nosuchkey"), 404, "nosuchkey")
        _refused(await admin.post("/v1/keys", json={"name": "x", "scope": "admin", "endpoints": [ep]}), 400,
                 "endpoints")
        _refused(await admin.post("/v1/keys", json={"name": "x"}), 400, "scope")
        _refused(await admin.post("/v1/keys", json={"name": "x", "scope": "root"}), 400, "scope")
        _refused(await admin.post("/v1/keys", json={"name": "", "scope": "admin"}), 400, "name")

    # What the bucket holds: the SHA-256 of the secret, never the secret.
    kv = await replicas[0].bus.kv(subjects.KV_API_KEYS)
    raw = (await kv.get(made["id"])).value
    assert random_part.encode() not in raw and secret.encode() not in raw
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw
    async with replicas[0].client(secret) as keyed:
        assert (await keyed.get(f"/v2/{ep}/health")).status_code == 200


async def test_an_endpoint_key_reaches_only_its_endpoints(replicas) -> None:
    async with replicas[0].client() as admin:
        ep_a, ep_b = await _endpoint(admin, "a"), await _endpoint(admin, "b")
        job_b = (await admin.post(f"/v2/{ep_b}/run", json={"input": {}})).json()["id"]
        key_a = (await _new_key(admin, name="a-only", scope="endpoint", endpoints=[ep_a]))["key"]
        key_all = (await _new_key(admin, name="inference", scope="endpoint"))["key"]
        key_admin = (await _new_key(admin, name="ops", scope="admin"))["key"]

    async with replicas[0].client(key_a) as http:
        job_a = (await http.post(f"/v2/{ep_a}/run", json={"input": {}})).json()["id"]
        assert (await http.get(f"/v2/{ep_a}/status/{job_a}")).json()["status"] == "IN_QUEUE"
        assert (await http.get(f"/v2/{ep_a}/health")).status_code == 200
        # Endpoint B, by any route, is refused with B named.
        _refused(await http.post(f"/v2/{ep_b}/run", json={"input": {}}), 403, ep_b)
        _refused(await http.get(f"/v2/{ep_b}/status/{job_b}"), 403, ep_b)
        _refused(await http.post(f"/v2/{ep_b}/cancel/{job_b}"), 403, ep_b)
        _refused(await http.post(f"/v2/{ep_b}/purge-queue"), 403, ep_b)
        _refused(await http.get(f"/v1/endpoints/{ep_b}"), 403, ep_b)
        _refused(await http.get(f"/v1/endpoints/{ep_b}/jobs"), 403, ep_b)
        # B's job through A's path is not found (jobs are looked up under the endpoint).
        _refused(await http.get(f"/v2/{ep_a}/status/{job_b}"), 404)
        # Reads of its own endpoint; the list shows only it.
        assert (await http.get(f"/v1/endpoints/{ep_a}")).json()["id"] == ep_a
        assert [e["id"] for e in (await http.get("/v1/endpoints")).json()] == [ep_a]
        # Never changes, nodes or key management.
        _refused(await http.post("/v1/endpoints", json={"name": "x", "command": ["true"]}), 403,
                 "create endpoints")
        _refused(await http.patch(f"/v1/endpoints/{ep_a}", json={"workersMax": 5}), 403, "change")
        _refused(await http.delete(f"/v1/endpoints/{ep_a}"), 403, "change or delete")
        _refused(await http.get("/v1/nodes"), 403, "/v1/nodes")
        _refused(await http.get("/v1/keys"), 403, "API keys")
        _refused(await http.post("/v1/keys", json={"name": "x", "scope": "admin"}), 403, "API keys")
    async with replicas[0].client() as admin:  # nothing changed behind the refusals
        spec_a = (await admin.get(f"/v1/endpoints/{ep_a}")).json()
        assert spec_a["workersMax"] == 3
        assert (await admin.get(f"/v2/{ep_b}/status/{job_b}")).json()["status"] == "IN_QUEUE"

    async with replicas[0].client(key_all) as http:  # every endpoint's /v2, still no management
        assert (await http.get(f"/v2/{ep_b}/status/{job_b}")).status_code == 200
        assert {e["id"] for e in (await http.get("/v1/endpoints")).json()} >= {ep_a, ep_b}
        _refused(await http.delete(f"/v1/endpoints/{ep_b}"), 403, "admin key")
    async with replicas[0].client(key_admin) as http:  # a made admin key manages keys and endpoints
        assert (await http.post("/v1/keys", json={"name": "more", "scope": "endpoint"})).status_code == 201
        assert (await http.patch(f"/v1/endpoints/{ep_a}", json={"workersMax": 4})).status_code == 200


async def test_unknown_wrong_and_revoked_keys_are_refused_on_every_replica(replicas) -> None:
    one, two = replicas
    async with one.client() as admin:
        ep = await _endpoint(admin, "a")
        made = await _new_key(admin, name="soon-revoked", scope="endpoint", endpoints=[ep])
    secret = made["key"]
    async with one.client(secret) as on_one, two.client(secret) as on_two:
        assert (await on_one.get(f"/v2/{ep}/health")).status_code == 200  # the creating replica at once
        assert (await on_two.get(f"/v2/{ep}/health")).status_code == 200  # and the other (watch or read)

        for bad in (None, "", "nope", secret[:-1] + ("A" if secret[-1] != "A" else "B"),
                    f"rpk_{made['id']}_", f"rpk_{made['id']}", secret + "x", "rpk_nosuchkey_" + "x" * 43):
            async with two.client(bad) as http:
                _refused(await http.get(f"/v2/{ep}/health"), 401, "API key")
                _refused(await http.get("/v1/endpoints"), 401, "API key")

        async with one.client() as admin:
            assert (await admin.delete(f"/v1/keys/{made['id']}")).json() == {"id": made["id"], "deleted": True}
            revoked_at = time.perf_counter()
            _refused(await on_one.get(f"/v2/{ep}/health"), 401, "revoked")  # the revoking replica at once
            await async_wait_until(lambda: _status(on_two, f"/v2/{ep}/health", 401), timeout_s=5,
                                   interval_s=0.002, what="the revoked key refused by the other replica")
            FIGURES["revoked key refused by another replica ms"] = (time.perf_counter() - revoked_at) * 1000
            _refused(await on_two.post(f"/v2/{ep}/run", json={"input": {}}), 401)
            assert made["id"] not in [k["id"] for k in (await admin.get("/v1/keys")).json()]
            _refused(await admin.get(f"/v1/keys/{made['id']}"), 404)
            _refused(await admin.delete(f"/v1/keys/{made['id']}"), 404)
    # Within the bound docs/reliability.md gives (a watch delivers in milliseconds).
    assert FIGURES["revoked key refused by another replica ms"] < 2000, FIGURES
    print(FIGURES)


async def test_a_key_made_on_one_replica_works_on_another_before_its_watch_brings_it(replicas) -> None:
    """The other replica has never heard of the key (its watch is stopped here, so this does
    not depend on which comes first): it reads the key from the bucket once, accepts it at
    once, and refuses it again as soon as it is revoked. A made-up id is read once and its
    miss remembered."""
    one, two = replicas
    assert two.gateway.keys.mirror is not None
    await two.gateway.keys.mirror.stop()
    async with one.client() as admin:
        ep = await _endpoint(admin, "fresh-key")
        made = await _new_key(admin, name="fresh", scope="endpoint", endpoints=[ep])
        assert two.gateway.keys.get(made["id"]) is None  # not in the other replica's copy
        async with two.client(made["key"]) as on_two:
            assert (await on_two.get(f"/v2/{ep}/health")).status_code == 200
            _refused(await on_two.get("/v1/keys"), 403, "admin key")  # its scope, read with it
            wrong = made["key"][:-1] + ("A" if made["key"][-1] != "A" else "B")
            async with two.client(wrong) as guessing:
                _refused(await guessing.get(f"/v2/{ep}/health"), 401, "API key")
            made_up = "rpk_0123456789abcdef_" + "x" * 43
            async with two.client(made_up) as guessing:
                _refused(await guessing.get(f"/v2/{ep}/health"), 401, "API key")
                assert "0123456789abcdef" in two.gateway.keys._misses
            assert (await admin.delete(f"/v1/keys/{made['id']}")).status_code == 200
            _refused(await on_two.get(f"/v2/{ep}/health"), 401, "API key")


async def _status(http: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await http.get(path)).status_code == status


# -- secrets in endpoint env --------------------------------------------------------------------


async def test_env_values_are_masked_in_answers_and_kept_for_workers(replicas) -> None:
    token = "hf_SECRET_token_value_123"
    async with replicas[0].client() as admin:
        created = await admin.post("/v1/endpoints", json={"name": "s", "command": ["true"],
                                                          "env": {"HF_TOKEN": token, "MODE": "plain"}})
        assert created.status_code == 201 and created.json()["env"] == {"HF_TOKEN": "***", "MODE": "***"}
        ep = created.json()["id"]
        answers = [created, await admin.get(f"/v1/endpoints/{ep}"), await admin.get("/v1/endpoints")]
        for other in replicas[1:]:
            async with other.client() as admin_two:
                answers.append(await admin_two.get(f"/v1/endpoints/{ep}"))
        # PATCH: the mask keeps a stored value; other values replace or add.
        patched = await admin.patch(f"/v1/endpoints/{ep}",
                                    json={"env": {"HF_TOKEN": "***", "MODE": "stream", "EXTRA": "1"}})
        assert patched.status_code == 200 and patched.json()["env"] == dict.fromkeys(
            ("HF_TOKEN", "MODE", "EXTRA"), "***")
        answers.append(patched)
        assert not [a.request.url for a in answers if token in a.text]
        # What workers get (the node agent reads the spec from KV): the real values.
        stored = (await replicas[0].bus.endpoints.get(ep)).value
        assert stored.env == {"HF_TOKEN": token, "MODE": "stream", "EXTRA": "1"}
        answers.append(await admin.patch(f"/v1/endpoints/{ep}", json={"workersMax": 2}))
        assert (await replicas[0].bus.endpoints.get(ep)).value.env == stored.env
        # The mask where no value is stored, or on create, is refused with the variable named.
        _refused(await admin.patch(f"/v1/endpoints/{ep}", json={"env": {"NEW": "***"}}), 400, "NEW", "***")
        _refused(await admin.post("/v1/endpoints", json={"name": "m", "command": ["true"],
                                                         "env": {"TOKEN": "***"}}), 400, "TOKEN")
        assert (await replicas[0].bus.endpoints.get(ep)).value.env == stored.env
        # Dropping a variable is still possible: an env without it.
        await admin.patch(f"/v1/endpoints/{ep}", json={"env": {"HF_TOKEN": "***"}})
        assert (await replicas[0].bus.endpoints.get(ep)).value.env == {"HF_TOKEN": token}


# -- request rate limits ------------------------------------------------------------------------


async def test_rate_limits_answer_429_with_retry_after_and_spare_other_endpoints(replicas) -> None:
    """RunPod's default limits, on without any setting: purge-queue 2 per 10 s, cancel 100 per
    10 s; past them 429 with a JSON error and Retry-After; other endpoints and operations go on."""
    replica = replicas[0]
    async with replica.client() as http:
        ep_a, ep_b = await _endpoint(http, "a"), await _endpoint(http, "b")
        for _ in range(2):
            assert (await http.post(f"/v2/{ep_a}/purge-queue")).status_code == 200
        over = await http.post(f"/v2/{ep_a}/purge-queue")
        _refused(over, 429, "rate limit", "purge-queue", ep_a)
        assert 1 <= int(over.headers["retry-after"]) <= 10
        assert (await http.post(f"/v2/{ep_b}/purge-queue")).status_code == 200  # another endpoint
        assert (await http.get(f"/v2/{ep_a}/health")).status_code == 200  # another operation
        assert (await http.post(f"/v2/{ep_a}/run", json={"input": {}})).status_code == 200

        # cancel: 100 per 10 s (counted whether or not the job exists).
        statuses = [(await http.post(f"/v2/{ep_a}/cancel/nojob{i}")).status_code for i in range(100)]
        assert set(statuses) == {404}, statuses
        _refused(await http.post(f"/v2/{ep_a}/cancel/nojob"), 429, "more than 100 /cancel")

        # Effective limit = max(base, running workers x per-worker): 12 running workers of
        # endpoint B (as a node agent reports them) lift B's cancel limit to 12 x 10 = 120.
        now_ms = int(time.time() * 1000)
        workers = [WorkerInfo(worker_id=f"w{i}", endpoint_id=ep_b, state="running" if i % 2 else "idle",
                              started_at_ms=now_ms)
                   for i in range(12)]
        await replica.bus.nodes.put("n1", NodeStatus(node_id="n1", hostname="h", runtime="process",
                                                     workers=workers, heartbeat_at_ms=now_ms))
        # (The gateway's copy of rp-nodes was started when endpoint A met its base limit.)
        async def counted() -> bool:
            return replica.gateway.running_workers(ep_b) == 12

        await async_wait_until(counted, timeout_s=5, what="the gateway's copy of rp-nodes")
        codes = [(await http.post(f"/v2/{ep_b}/cancel/nojob{i}")).status_code for i in range(122)]
        assert codes == [404] * 120 + [429] * 2, codes
        _refused(await http.post(f"/v2/{ep_b}/cancel/nojob"), 429, "more than 120 /cancel", ep_b)
