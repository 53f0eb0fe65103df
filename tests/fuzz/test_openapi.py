"""The gateway's OpenAPI document fuzzed with schemathesis against a live gateway (a real
nats-server and the gateway as a process): every operation, a bounded number of examples
each. No 5xx, every error a JSON body naming the problem, every response as the document
says (status, content type, headers, schema).

No node agents run: the fuzzer may create, change and delete endpoints and queue jobs at
will without starting anything. Half the generated endpoint and job ids are swapped for
real ones (decided by the generated id, so runs stay reproducible), so the fuzzer gets past
"not found" into the handlers.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from runplane_testing.cluster import Cluster
from runplane_testing.natsserver import NatsServer, free_port, wait_port

pytestmark = pytest.mark.fuzz

# Enough to find the bugs below within the suite's time budget (about a minute here).
MAX_EXAMPLES = 25
# A /runsync or status-sync with no worker waits this long at most (the API allows 1-300 s).
WAIT_MS = 1000
REAL: dict[str, list[str]] = {"endpoint_id": [], "job_id": []}
# (/run and /runsync: an Idempotency-Key the fuzzer reuses with another body is refused, 422.)
CROSS_FIELD_RULES = {"POST /v1/endpoints", "PATCH /v1/endpoints/{endpoint_id}",
                     "POST /v2/{endpoint_id}/retry/{job_id}", "POST /v2/{endpoint_id}/run",
                     "POST /v2/{endpoint_id}/runsync", "POST /v1/endpoints/{endpoint_id}/dead-letters/replay"}


@pytest.fixture(scope="module")
def gateway():
    cluster = Cluster(nodes=0, env={"RP_RUNSYNC_WAIT_MS": str(WAIT_MS)})
    try:
        cluster.nats = NatsServer(log_path=str(cluster.workdir / "nats.log")).start()
        cluster.http_port = free_port()
        cluster.add("gateway", "runplane_gateway")
        wait_port("127.0.0.1", cluster.http_port, timeout_s=30)
        with cluster.client() as http:
            for name in ("fuzz-a", "fuzz-b"):
                ep = cluster.create_endpoint(name=name, command=["true"], workersMin=0, workersMax=2)
                REAL["endpoint_id"].append(ep)
                job = http.post(f"/v2/{ep}/run", json={"input": {"n": 1}}).json()["id"]
                REAL["job_id"].append(job)
        yield cluster
    finally:
        cluster.stop()


@schemathesis.hook
def map_case(context, case):
    """Real ids for half the cases (by the generated id's length), a short `wait`."""
    for name, real in REAL.items():
        value = (case.path_parameters or {}).get(name)
        if isinstance(value, str) and real and len(value) % 2 == 0:
            case.path_parameters[name] = real[len(value) % len(real)]
    if case.query and "wait" in case.query:
        try:  # a valid wait stays valid (and short); an invalid one stays invalid
            if WAIT_MS < int(case.query["wait"]) <= 300_000:
                case.query["wait"] = WAIT_MS
        except (TypeError, ValueError):
            pass
    return case


@schemathesis.check
def errors_name_the_problem(ctx, response, case):
    """A 4xx or 5xx answer is JSON `{"error": "<what is wrong>"}`."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), f"error answered as {content_type!r}"
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip(), body
    return True


def test_gateway_conforms_to_its_openapi_document(gateway):
    """Each operation in turn, with schema-valid and schema-invalid data (the schemathesis
    pytest plugin's lazy loading does not work with this pytest); every failure is collected
    so that one run shows them all."""
    schema = schemathesis.openapi.from_url(f"{gateway.gateway_url}/openapi.json")
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    for operation in operations:
        # Rules JSON Schema cannot say (workersMin <= workersMax, a command or an imageName,
        # what a process can be started with; /retry of a job that is not FAILED or TIMED_OUT):
        # a schema-valid body may still be refused there, with a 400 naming the problem.
        cross_field = [positive_data_acceptance] if operation.label in CROSS_FIELD_RULES else []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            excluded = list(cross_field)
            if mode is GenerationMode.NEGATIVE and operation.query:
                # Unknown query parameters are ignored on purpose (as RunPod's API does), so a
                # case whose only fault is an extra one is rightly answered; bad values of the
                # known ones are still refused (the bounds tests of wait and limit show it).
                excluded.append(negative_data_rejection)
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                case.call_and_validate(base_url=gateway.gateway_url, headers=headers, timeout=30,
                                       additional_checks=[errors_name_the_problem], excluded_checks=excluded)

            try:
                fuzz()
            except Unsatisfiable:  # nothing to get wrong: no parameters, no body
                assert mode is GenerationMode.NEGATIVE and not operation.path_parameters, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # keep going: report every failing operation
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_gateway_survived_the_fuzzing(gateway):
    assert [name for name, svc in gateway.services.items() if not svc.alive] == []
    assert httpx.get(f"{gateway.gateway_url}/healthz").json() == {"status": "ok"}
    assert "Traceback" not in gateway.services["gateway"].log_text()


@pytest.mark.parametrize("query", ["wait=abc", "wait=0", "wait=999", "wait=300001", "wait=-5"])
def test_bad_values_of_known_query_parameters_are_refused(gateway, query):
    """What the negative fuzzing of query-string operations leaves to this test (on an
    endpoint of its own: the fuzzer may have deleted the shared ones)."""
    ep = gateway.create_endpoint(name="query-bounds", command=["true"], workersMin=0, workersMax=1)
    with gateway.client() as http:
        job = http.post(f"/v2/{ep}/run", json={"input": {}}).json()["id"]
        for method in ("GET", "POST"):
            resp = http.request(method, f"/v2/{ep}/status-sync/{job}?{query}")
            assert resp.status_code == 400 and "wait" in resp.json()["error"], resp.text
        resp = http.post(f"/v2/{ep}/runsync?{query}", json={"input": {}})
        assert resp.status_code == 400 and "wait" in resp.json()["error"], resp.text


@pytest.mark.parametrize("limit", ["abc", "-5"])
def test_bad_job_list_limits_are_refused(gateway, limit):
    ep = gateway.create_endpoint(name="limit-bounds", command=["true"], workersMin=0, workersMax=1)
    with gateway.client() as http:
        resp = http.get(f"/v1/endpoints/{ep}/jobs?limit={limit}")
        assert resp.status_code == 400 and "limit" in resp.json()["error"], resp.text
